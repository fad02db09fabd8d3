"""Settings: the one place the environment is read (``model.Settings.from_env``), grouped by
concern."""
