"""hydra-submitit-launcher launchers that name a killed job in one line (`named_failures`)."""
