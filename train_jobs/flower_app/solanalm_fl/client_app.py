"""ClientApp entry of the bundle: `train_jobs.fl_client`'s handlers for the job named in the run config."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from train_jobs import fl_client
from train_jobs.fl_deploy import job_of

app = ClientApp(mods=[fl_client.secagg_mod])  # SecAgg+ rounds of jobs that ask for it


@app.query()
def identify(message: Message, context: Context) -> Message:
    return fl_client.identify(job_of(context), message, context)


@app.train()
def train_round(message: Message, context: Context) -> Message:
    return fl_client.train_round(job_of(context), message, context)
