"""Every Redis key and channel Ferry uses, spelled in one place.

Layout (all strings, `{…}` filled in by the functions below):

- ``ferry:queue:{model}``           arq's queue (a sorted set of job ids) for one model
- ``ferry:wake:{model}``            list an idle worker BLPOPs on, so a new job skips arq's poll delay
- ``ferry:stream:{job}``            Redis Stream of the job's messages (delta / final / error);
                                    kept ``stream_ttl_s`` after its last write so clients can resume
- ``ferry:job:{job}:meta``          what a reader needs to render the stream (kind, model, created)
- ``ferry:job:{job}:worker``        id of the worker running the job (set when it starts)
- ``ferry:job:{job}:cancel``        present when the client went away; the worker stops
- ``ferry:worker:{worker}``         the worker's heartbeat record (JSON), expires when it goes silent
- ``ferry:workers``                 set of every worker id (stale ids pruned on read)
- ``ferry:control:{worker}``        list of commands for one worker (load / unload a model)
- ``ferry:reply:{id}``              list a command's answer is pushed to
- ``ferry:model:{model}:workers``   set of worker ids that serve the model (stale ids pruned on read)
- ``ferry:model:{model}:starting``  present while a start of the model is under way (one at a time)
- ``ferry:model:{model}:load``      hash: worker id -> the model's jobs it runs now
- ``ferry:model:{model}:prefer``    hash: queued job id -> the worker it was routed to (until taken)
- ``ferry:wake:{model}:{worker}``   wake list of one worker, for a job routed to it
- ``ferry:cache:{model}:{worker}``  set: prefix hashes of the prompts the worker's caches hold
                                    (`shared.fleet.cache_map`); expires with its heartbeat
- ``ferry:models``                  hash: model id -> model record (JSON)
- ``ferry:download:{model}``        hash: a download's progress (bytes done/total, speed, state)
- ``ferry:download:{model}:cancel`` present when the download should stop
- ``ferry:seq``                     counter giving every stored object its place in listings
- ``ferry:obj:{kind}:{id}``         a stored object (JSON): kind is assistant, thread or run
- ``ferry:owner:{owner}:{kind}``    sorted set: the owner's objects of that kind, by creation order
- ``ferry:thread:{id}:messages``    hash: message id -> message (JSON)
- ``ferry:thread:{id}:order``       sorted set: message id -> its place in the thread (total order)
- ``ferry:thread:{id}:seq``         counter behind that order
- ``ferry:thread:{id}:runs``        sorted set: the thread's runs, by creation order
- ``ferry:user:{id}``               a user (JSON)
- ``ferry:username:{name}``         the id of the user with that name
- ``ferry:user:{id}:keys``          hash: API key id -> SHA-256 of its secret
- ``ferry:apikey:{sha256}``         an API key's record (JSON), found by its secret's hash
- ``ferry:refresh:{sha256}``        a refresh token (by hash) -> user id; deleted when redeemed
- ``ferry:login:{sha256}``          a login begun with OIDC (verifier, nonce) by its state's hash
- ``ferry:identity:{sha256}``       the user id of an OIDC identity, by the hash of issuer + subject
- ``ferry:rate:{scope}:{who}:{n}``  requests counted in fixed window n of a rate limit
- ``ferry:metrics:requests``        hash: "method, route, status" -> requests served
- ``ferry:metrics:jobs``            hash: "model, outcome" -> jobs
- ``ferry:metrics:tokens``          hash: model -> completion tokens generated
- ``ferry:metrics:routes``         hash: "model, decision" -> jobs routed so; "…, cached" -> their
                                    prompt tokens the worker found cached
- ``ferry:metrics:{kind}:{model}``  hash: a histogram's cumulative buckets, "+Inf" and "sum"
- ``ferry:batches``                 set of batch ids not yet finished (a batch runner drives each)
- ``ferry:batch:{id}:lease``        the web process driving the batch now (expires if it dies)
- ``ferry:batch:{id}:input``        hash: line number -> the request (JSON), as validated
- ``ferry:batch:{id}:next``         how many lines have been handed to the queue
- ``ferry:batch:{id}:running``      hash: line number -> the job running it (JSON)
- ``ferry:batch:{id}:results``      hash: line number -> its result line (JSON), output or error
- ``ferry:batch:lines:{model}``     set: jobs of every batch queued or running on the model
- ``ferry:response:{id}``           a stored response (JSON): its request, owner, and once known
                                    its result; its job's stream is kept as long
- ``arq:job:{job}``, ``arq:in-progress:{job}``, ``arq:result:{job}``  arq's own, named here for cleanup
"""

from __future__ import annotations

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix

PREFIX = "ferry"

MODELS = f"{PREFIX}:models"


def download(model: str) -> str:
    return f"{PREFIX}:download:{model}"


def download_cancel(model: str) -> str:
    return f"{PREFIX}:download:{model}:cancel"


def queue(model: str) -> str:
    return f"{PREFIX}:queue:{model}"


def wake(model: str) -> str:
    return f"{PREFIX}:wake:{model}"


def stream(job_id: str) -> str:
    return f"{PREFIX}:stream:{job_id}"


def job_meta(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:meta"


def job_worker(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:worker"


def job_cancel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:cancel"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


WORKERS = f"{PREFIX}:workers"


def control(worker_id: str) -> str:
    return f"{PREFIX}:control:{worker_id}"


def reply(reply_id: str) -> str:
    return f"{PREFIX}:reply:{reply_id}"


def model_workers(model: str) -> str:
    return f"{PREFIX}:model:{model}:workers"


def model_starting(model: str) -> str:
    return f"{PREFIX}:model:{model}:starting"


def model_load(model: str) -> str:
    return f"{PREFIX}:model:{model}:load"


def model_prefer(model: str) -> str:
    return f"{PREFIX}:model:{model}:prefer"


def wake_worker(model: str, worker_id: str) -> str:
    return f"{PREFIX}:wake:{model}:{worker_id}"


def cache_map(model: str, worker_id: str) -> str:
    return f"{PREFIX}:cache:{model}:{worker_id}"


SEQ = f"{PREFIX}:seq"


def obj(kind: str, object_id: str) -> str:
    return f"{PREFIX}:obj:{kind}:{object_id}"


def owned(owner: str, kind: str) -> str:
    return f"{PREFIX}:owner:{owner}:{kind}"


def thread_messages(thread_id: str) -> str:
    return f"{PREFIX}:thread:{thread_id}:messages"


def thread_order(thread_id: str) -> str:
    return f"{PREFIX}:thread:{thread_id}:order"


def thread_seq(thread_id: str) -> str:
    return f"{PREFIX}:thread:{thread_id}:seq"


def thread_runs(thread_id: str) -> str:
    return f"{PREFIX}:thread:{thread_id}:runs"


def user(user_id: str) -> str:
    return f"{PREFIX}:user:{user_id}"


def user_by_name(name: str) -> str:
    return f"{PREFIX}:username:{name}"


def user_keys(user_id: str) -> str:
    return f"{PREFIX}:user:{user_id}:keys"


def api_key(digest: str) -> str:
    return f"{PREFIX}:apikey:{digest}"


def refresh_token(digest: str) -> str:
    return f"{PREFIX}:refresh:{digest}"


def login_state(digest: str) -> str:
    return f"{PREFIX}:login:{digest}"


def identity(digest: str) -> str:
    return f"{PREFIX}:identity:{digest}"


def rate(scope: str, who: str, window: int) -> str:
    return f"{PREFIX}:rate:{scope}:{who}:{window}"


METRICS_REQUESTS = f"{PREFIX}:metrics:requests"
METRICS_JOBS = f"{PREFIX}:metrics:jobs"
METRICS_TOKENS = f"{PREFIX}:metrics:tokens"
METRICS_NO_WORKER = f"{PREFIX}:metrics:no_worker"
METRICS_ROUTES = f"{PREFIX}:metrics:routes"


def metrics_histogram(kind: str, model: str) -> str:
    return f"{PREFIX}:metrics:{kind}:{model}"


def arq_in_progress(job_id: str) -> str:
    """arq's marker of a job a worker took; set for the job timeout + 10 s."""
    return in_progress_key_prefix + job_id


def arq_job_keys(job_id: str) -> list[str]:
    """arq's own keys for one job: its definition, in-progress marker and result."""
    return [job_key_prefix + job_id, arq_in_progress(job_id), result_key_prefix + job_id]


BATCHES = f"{PREFIX}:batches"


def batch(batch_id: str, part: str) -> str:
    """One of a batch's keys: lease, input, next, running, results."""
    return f"{PREFIX}:batch:{batch_id}:{part}"


def batch_lines(model: str) -> str:
    return f"{PREFIX}:batch:lines:{model}"


def response(response_id: str) -> str:
    return f"{PREFIX}:response:{response_id}"
