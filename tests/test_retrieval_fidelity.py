"""Two places where this repository counts differently from DPR on purpose (README, differences table)."""
from dpr.evaluation.qa_validation import calculate_matches

PASSAGES = {"1": ("paris is the capital", "France"), "2": ("berlin is a city", "Germany"),
            "3": ("rome is old", "Italy")}


def test_top_k_lists_of_unequal_length_are_counted_to_the_longest():
    """DPR sizes the counts by the first question's list, so a shorter first list loses the deeper ranks of the
    others; here they run to the longest list, and a question hit within its shorter list counts at every deeper
    k."""
    closest = [(["2"], [1.0]), (["3", "2", "1"], [3.0, 2.0, 1.0])]
    stats = calculate_matches(PASSAGES, [["berlin"], ["paris"]], closest, 1, "string")
    assert stats.questions_doc_hits == [[True], [False, False, True]]
    assert stats.top_k_hits == [1, 1, 2]


def test_an_answer_without_tokens_is_found_nowhere():
    """DPR's token loop finds an answer with no tokens ('?' after tokenising) in every passage; here it never
    matches, so such a question counts as a miss."""
    stats = calculate_matches(PASSAGES, [["?"]], [(["1", "2"], [2.0, 1.0])], 1, "string")
    assert stats.questions_doc_hits == [[False, False]] and stats.top_k_hits == [0, 0]
