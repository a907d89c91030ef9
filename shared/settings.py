"""Ferry's one settings class, read from the environment and `.env` (prefix ``FERRY_``)."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob Ferry has. `ferry --help` prints this list."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", env_file=".env", extra="ignore")

    # Where things live
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "FERRY_REDIS_URL"),
        description="Redis to use (REDIS_URL); unset: `ferry serve` starts a private one",
    )
    data_dir: Path = Field(
        Path(platformdirs.user_data_dir("ferry")),
        description="Ferry's data folder: embedded Redis files, models",
    )
    models_dir: Path | None = Field(None, description="Models folder (default: DATA_DIR/models)")
    default_model: str = Field(
        "smollm2-135m-instruct", description="Model used when a request names none"
    )

    # Web
    host: str = Field("127.0.0.1", description="Address `ferry serve` / `ferry web` binds")
    port: int = Field(1337, description="Port `ferry serve` / `ferry web` binds")
    max_body_bytes: int = Field(2 * 1024 * 1024, description="Largest request body (413 above)")
    max_message_chars: int = Field(256_000, ge=1, description="Longest stored message (400 above)")

    # Server mode: users, tokens, rate limits
    auth: bool = Field(False, description="on: every request needs a JWT or API key (Jan Server)")
    allow_insecure: bool = Field(
        False, description="Allow binding a non-loopback address with auth off"
    )
    jwt_secret: SecretStr | None = Field(None, description="HMAC secret signing Ferry's JWTs")
    jwt_private_key_file: Path | None = Field(
        None, description="PEM private key (RSA or EC P-256) signing Ferry's JWTs instead of "
        "the secret (RS256/ES256)")
    jwt_issuer: str = Field("ferry", description="JWT issuer (iss), checked on every token")
    jwt_audience: str = Field("ferry-api", description="JWT audience (aud), checked too")
    access_token_ttl_s: int = Field(3600, ge=60, description="Lifetime of an access JWT")
    refresh_token_ttl_s: int = Field(30 * 86400, ge=60, description="Lifetime of a refresh token")
    oidc_issuer: str = Field("https://accounts.google.com",
                             description="OpenID Connect provider for /auth/google login")
    oidc_client_id: str | None = Field(None, description="OIDC client id; login is off without it")
    oidc_client_secret: SecretStr | None = Field(None, description="OIDC client secret")
    oidc_redirect_uri: str | None = Field(
        None, description="Callback URL registered with the provider (default: this server's "
        "/auth/google/callback as the request reached it)")
    oidc_scopes: str = Field("openid email profile", description="Scopes asked for at login")
    rate_limit_user_per_hour: int = Field(1000, ge=0, description="Requests per user (0: none)")
    rate_limit_ip_per_hour: int = Field(
        100, ge=0, description="Unauthenticated requests per IP (0: none)"
    )
    rate_limit_inference_per_minute: int = Field(
        60, ge=0, description="Completions and runs per user (0: none)"
    )
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS, or *")

    # Model loading (Jan's defaults)
    ctx_len: int = Field(4096, ge=64, description="Context length per model")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens one request may generate, on every endpoint (llama-server's "
        "--n-predict): a request asking for more, or for no limit, stops here with its API's "
        "length reason (unset: the context is the limit)")
    n_batch: int = Field(
        512, ge=1, description="Tokens decoded per step: generating sequences, then prompt chunks")
    n_threads: int | None = Field(
        None, ge=1, description="CPU threads (unset: every physical core, as llama.cpp counts)")
    n_gpu_layers: int = Field(-1, description="Layers to offload to the GPU (-1: all)")
    parallel: int = Field(
        8, ge=1, le=256, description="Sequences a loaded model generates at once (one KV cache "
        "of ctx_len tokens shared by all)")
    batch_parallel: int | None = Field(
        None, ge=1, le=256, description="Sequences batch lines may fill while no interactive job "
        "runs, in the same KV cache (unset: 2 × parallel; interactive jobs pause lines back to "
        "parallel)")
    cache_ram_mb: int = Field(
        1024, ge=0, description="Host memory (MiB) per loaded model for idle sequences' KV cache: "
        "moved out of the context while others generate, back when a prompt starts the same "
        "way (llama-server's --cache-ram; 0: idle sequences stay in the context)")

    # Where models run
    auto_start: bool = Field(
        True, description="A request for a downloaded model no worker holds loads it first"
    )
    load_timeout_s: float = Field(120.0, gt=0, description="Longest a model start may take")
    max_loaded_models: int = Field(3, ge=1, description="Models one worker holds at once")
    worker_memory: int | None = Field(
        None, ge=0, description="Bytes a worker may fill with models (unset: GPU or host memory)"
    )
    keep_alive_s: float = Field(
        0.0, ge=0, description="Unload a model idle this long (0: keep it loaded)"
    )

    cache_routing: bool = Field(
        True, description="With several workers on a model, send a chat's next turn to the "
        "worker whose prompt cache holds its history (off: any worker takes any job)")
    route_max_load: float = Field(
        1.0, gt=0, description="A worker running (or routed) this share of its sequences or more "
        "gets no more turns for its cache: the least-loaded worker takes them")
    route_wait_ms: int = Field(
        500, ge=0, description="How long other workers leave a job routed to one worker, before "
        "whichever is free may take it")

    # Model downloads
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// sources")
    s3_region: str = Field("us-east-1", description="S3 region")
    download_retries: int = Field(5, ge=0, description="Resumes after a dropped download")

    # Queue and stream
    queue_limit: int = Field(64, ge=1, description="Jobs waiting per model before 429")
    worker_wait_s: float = Field(
        3.0, gt=0, description="How long a request waits for a live worker before 503"
    )
    job_timeout_s: float = Field(600.0, gt=0, description="Longest a worker spends on one job")
    stream_ttl_s: int = Field(300, ge=10, description="How long finished chunks are kept for resume")
    stream_interval_ms: float = Field(
        50.0, ge=0, description="How often a worker writes the middle of its streams (a job's "
        "first token and its end go at once; when decode steps are longer, every two steps, up "
        "to 4 times this). Each write wakes Redis, the web process and the clients: longer "
        "gives more throughput on a busy CPU, shorter a smoother stream; 0: every step")
    redis_outage_s: float = Field(
        30.0, gt=0, description="How long a Redis restart may take: workers hold their streams' "
        "messages and web processes keep their streams open (pinging) this long, then give up "
        "with an error")
    heartbeat_s: float = Field(1.0, gt=0, description="Worker heartbeat interval")
    heartbeat_ttl_s: float = Field(
        3.0, gt=0, description="A worker silent this long counts as dead"
    )
    keepalive_s: float = Field(10.0, gt=0, description="SSE comment ping when a stream is idle")
    resume_grace_s: float = Field(
        5.0, ge=0, description="A streaming client that drops has this long to come back "
        "(Last-Event-ID) before its job is cancelled")
    async_ttl_s: int = Field(
        86400, ge=60, description="How long an async request's (Prefer: respond-async) result "
        "is kept")
    responses_ttl_s: int = Field(
        30 * 86400, ge=60, description="How long a stored response (/v1/responses, store true) "
        "and its event stream are kept")
    drain_s: float = Field(
        60.0, ge=0, description="On SIGTERM: how long a worker lets its jobs in flight, and a web "
        "process its open requests, finish (a second signal: at once)")

    # Files and batches
    files_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest uploaded file")
    files_s3_bucket: str | None = Field(
        None, description="Keep files in this S3 bucket (any S3-compatible store) instead of "
        "DATA_DIR/files, so web nodes on several machines share them")
    files_s3_prefix: str = Field("ferry/files/", description="Key prefix of files in the bucket")
    files_s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for files (default: FERRY_S3_ENDPOINT_URL)")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Largest batch input file")
    batch_max_lines: int = Field(50_000, ge=1, description="Most requests in one batch")
    batch_window_s: float = Field(
        86400.0, gt=0, description="How long a batch may run ('24h', the only completion_window)")

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def sequences(self) -> int:
        """The context's sequences: batch lines may fill all of them, interactive jobs `parallel`."""
        return max(self.parallel, self.batch_parallel or 2 * self.parallel)

