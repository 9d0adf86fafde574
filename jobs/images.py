"""`ray job submit --working-dir . -- python jobs/images.py --config <preset|yaml> --run-dir <dir|uri> key=value`:
the images stage alone (= `selma images`), resuming whatever a previous job left."""

from _entrypoint import run

if __name__ == "__main__":
    run("images")
