"""`ray job submit --working-dir . -- python jobs/prompts.py --config <preset|yaml> --run-dir <dir|uri> key=value`:
the prompts stage alone (= `selma prompts`), resuming whatever a previous job left."""

from _entrypoint import run

if __name__ == "__main__":
    run("prompts")
