#!/usr/bin/env bash
# The whole DPR pipeline on the shipped sample (data/sample: 100 passages, 160 training and 40 dev questions) with
# the offline MiniLM encoder: train the bi-encoder with the gradient cache, embed the passages in 2 shards, index
# and retrieve (dense, BM25, hybrid), preprocess reader data, train the reader briefly, print EM.
#
#   scripts/demo.sh [RUN_DIR]        (default runs/demo-<timestamp>; `make demo` runs it)
#
# Settings are small so that it takes a few minutes on 2 CPU cores; every output lands in RUN_DIR.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if (( $# > 1 )); then
    echo "usage: $0 [RUN_DIR]" >&2
    exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
RUN=${1:-$repo/runs/demo-$(date +%Y%m%d-%H%M%S)}
[[ $RUN == /* ]] || RUN=$PWD/$RUN  # relative to the caller's directory
cd "$repo"  # the entry scripts and data/sample are named from the repository root
RUN=${RUN#"$repo"/}  # shorter commands when the run directory is inside the repository
PYTHON=${PYTHON:-python}
SAMPLE=data/sample
mkdir -p "$RUN"
started=$SECONDS

# bf16 autocast trains and encodes about 2x faster on CPUs with AMX or AVX512-BF16, and slower on others.
# BF16=true/false overrides the check.
BF16=${BF16:-auto}
if [[ $BF16 == auto ]]; then
    if grep -qswE 'amx_bf16|avx512_bf16' /proc/cpuinfo; then BF16=true; else BF16=false; fi
fi

# Echo a command as it can be pasted into a shell (quoting what the shell would expand), then run it.
run() {
    local arg shown=()
    for arg in "$@"; do
        if [[ "$arg" =~ [^A-Za-z0-9_./=:,+-] ]]; then shown+=("'$arg'"); else shown+=("$arg"); fi
    done
    printf '\n+ %s\n' "${shown[*]}" >&2
    "$@"
}

# 1. The bi-encoder: batches of 16 questions, each with its positive and one hard negative passage, encoded by the
#    gradient cache in chunks of 8. One epoch (10 steps); hydra's logs and config go to $RUN/logs/<step>.
#    MiniLM as it was pre-trained: mean pooling, cosine similarity (temperature 0.05), one tower for questions
#    and passages (DPR's [CLS] vectors and two towers are the defaults; 10 steps cannot retrain MiniLM for them).
run "$PYTHON" train_dense_encoder.py encoder=minilm encoder.sequence_length=128 \
    encoder.pooling=mean encoder.similarity=cosine encoder.temperature=0.05 encoder.share_encoders=true \
    "train_datasets=[$SAMPLE/biencoder-train.json]" "dev_datasets=[$SAMPLE/biencoder-dev.json]" \
    train.batch_size=16 train.grad_cache=true train.q_chunk_size=8 train.ctx_chunk_size=8 \
    train.num_train_epochs=1 train.learning_rate=3e-5 train.warmup_steps=1 train.log_batch_step=2 \
    bf16=$BF16 output_dir="$RUN/biencoder" hydra.run.dir="$RUN/logs/train_biencoder"
MODEL=$RUN/biencoder/dpr_biencoder.0

# 2. Passage embeddings in 2 shards (hydra multirun: one job per shard, one after the other).
run "$PYTHON" generate_dense_embeddings.py -m model_file="$MODEL" ctx_src=$SAMPLE/psgs.tsv \
    shard_id=0,1 num_shards=2 bf16=$BF16 out_file="$RUN/embeddings/psgs" hydra.sweep.dir="$RUN/logs/embed"

# 3. Index the shards (saved in $RUN/index) and retrieve for the dev questions with the trained encoder, BM25 and
#    their hybrid; the printed tables are kept in $RUN/retrieval/dev.txt.
mkdir -p "$RUN/retrieval"
run "$PYTHON" dense_retriever.py model_file="$MODEL" qa_dataset=$SAMPLE/dev.qa.csv \
    "ctx_datatsets=[$SAMPLE/psgs.tsv]" "encoded_ctx_files=[$RUN/embeddings/psgs_*]" index_path="$RUN/index/" \
    "retriever=[dense,bm25,hybrid]" bf16=$BF16 out_file="$RUN/retrieval/dev.json" \
    hydra.run.dir="$RUN/logs/retrieve_dev" | tee "$RUN/retrieval/dev.txt"
grep -A 3 '^ retriever |' "$RUN/retrieval/dev.txt" > "$RUN/topk_table.txt"

# 4. Retrieval for the training questions too (the reader trains on them), from the saved index.
run "$PYTHON" dense_retriever.py model_file="$MODEL" qa_dataset=$SAMPLE/train.qa.csv \
    "ctx_datatsets=[$SAMPLE/psgs.tsv]" index_path="$RUN/index/" n_docs=20 bf16=$BF16 \
    out_file="$RUN/retrieval/train.json" hydra.run.dir="$RUN/logs/retrieve_train" \
    | tee "$RUN/retrieval/train.txt"

# 5. Reader samples from the dense results, tokenized as the reader reads them (DPR's pickles).
run "$PYTHON" preprocess_reader_data.py --retriever_results "$RUN/retrieval/train.json" --is_train_set \
    --out_file "$RUN/reader_data/train" --pretrained_model_cfg minilm --do_lower_case --sequence_length 128 \
    --num_workers 2 --output_format pkl hydra.run.dir="$RUN/logs/preprocess_train"
run "$PYTHON" preprocess_reader_data.py --retriever_results "$RUN/retrieval/dev.json" \
    --out_file "$RUN/reader_data/dev" --pretrained_model_cfg minilm --do_lower_case --sequence_length 128 \
    --num_workers 2 --output_format pkl hydra.run.dir="$RUN/logs/preprocess_dev"

# 6. The reader: 3 epochs (120 steps of 4 questions x 4 passages, one of them the positive; a high learning rate for
#    so short a run), then EM on the dev questions with the answer taken from the top 1 and the top 5 passages.
#    (Its folder is made first: the validation writes the predictions before any checkpoint creates it.)
mkdir -p "$RUN/reader"
run "$PYTHON" train_reader.py encoder=minilm encoder.sequence_length=128 \
    "train_files=$RUN/reader_data/train.*.pkl" "dev_files=$RUN/reader_data/dev.*.pkl" \
    train.batch_size=4 passages_per_question=4 train.num_train_epochs=3 train.learning_rate=2e-4 \
    train.warmup_steps=10 train.log_batch_step=20 passages_per_question_predict=5 'eval_top_docs=[1,5]' \
    bf16=$BF16 output_dir="$RUN/reader" prediction_results_file="$RUN/reader/dev_predictions.json" \
    hydra.run.dir="$RUN/logs/train_reader"

em_line() { sed -n "s/.*n=$1\tEM //p" "$RUN/logs/train_reader/train_reader.log" | tail -n 1; }
echo
echo "Top-k retrieval accuracy on the dev questions ($RUN/topk_table.txt):"
cat "$RUN/topk_table.txt"
echo "Reader exact match (EM) on the dev questions: $(em_line 1) from the top passage, $(em_line 5) from the top 5"
echo "Done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s; all outputs in $RUN"
