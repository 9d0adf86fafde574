"""`ray job submit --working-dir . -- python jobs/pipeline.py --config <preset|yaml> --run-dir <dir|uri> key=value`:
every stage, prompts → images → train → merge (= `selma run`; `--until images` stops early)."""

from _entrypoint import run

if __name__ == "__main__":
    run("run")
