"""`ray job submit --working-dir . -- python jobs/world_experiment.py OUT [--arms a,b] key=value`:
SELMA measured in the shapes world, every arm (= `selma world experiment`)."""

from _entrypoint import run

if __name__ == "__main__":
    run("world", "experiment")
