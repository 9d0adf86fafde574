"""`ray job submit --working-dir . -- python jobs/train.py --config <preset|yaml> --run-dir <dir|uri> key=value`:
the train stage alone (= `selma train`), resuming whatever a previous job left."""

from _entrypoint import run

if __name__ == "__main__":
    run("train")
