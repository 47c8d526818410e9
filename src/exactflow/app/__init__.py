"""The application layer: run orchestration behind the CLI (train/eval/sample runs, reading
TOML, writing run folders)."""
