"""What the test files share: the config, CLI runs, data sets, run-folder readers, callbacks for real runs."""
