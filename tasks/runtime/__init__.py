"""Running the pipeline on a machine: the local stack behind `dpa up`/`dpa down` (`stack`), real
server processes (`servers`), stopping at a safe point on SIGTERM/SIGINT (`interrupt`) and where
fanned-out tasks run (`task_runners`). Used by flows/cli.py, the flows and the tests.
"""
