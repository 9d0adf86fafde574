"""`ray job submit --working-dir . -- python jobs/merge.py --config <preset|yaml> --run-dir <dir|uri> key=value`:
the merge stage alone (= `selma merge`), resuming whatever a previous job left."""

from _entrypoint import run

if __name__ == "__main__":
    run("merge")
