"""ServerApp entry of the bundle: the job comes in the run config; rounds are `train_jobs.fl_server`'s."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from train_jobs.fl_deploy import serve_run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve_run(grid, context)
