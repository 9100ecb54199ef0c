"""Joining the Ray cluster: the one `ray.init` of this package's drivers (`lladav data build`,
`lladav train`).

Owns: which cluster a driver joins (RAY_ADDRESS, else a local one) and the runtime_env its workers
get (this process's storage settings, storage.worker_env; the secret scrubber, lladav.secrets).
Does not own: what runs on the cluster (data/build.py, train/launch.py) or the storage settings
themselves (storage.py).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from lladav import storage


def ensure_ray(log_to_driver: bool = False) -> None:
    """Join the Ray cluster at RAY_ADDRESS, or start a local one when none is running.
    `log_to_driver` shows the workers' output on this console (`lladav train`: its step lines).

    The workers of an existing cluster were started with the cluster's environment, not this
    process's, so the storage settings set here (S3 endpoint, credentials, retry budget:
    storage.worker_env) reach this job's workers through its runtime_env, never a file. Keys a
    `ray job submit --runtime-env` already sets are left to it: Ray refuses a ray.init
    runtime_env that repeats them, and the submitted job's driver already runs with its values.
    """
    import ray

    if ray.is_initialized():
        return
    env_vars = storage.worker_env()
    if submitted := os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        job_env = (json.loads(submitted).get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    # Every worker scrubs secrets from its logs, warnings and uncaught exceptions (lladav.secrets).
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "lladav.secrets.install"}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
             log_to_driver=log_to_driver, runtime_env=runtime_env)
