"""`ray job submit --working-dir . -- python jobs/eval.py RUN_DIR --models base,merged key=value`:
score a run's models on DSG-1K / TIFA (= `selma eval`)."""

from _entrypoint import run

if __name__ == "__main__":
    run("eval")
