"""The cluster files and the paper's configs are valid and say what the paper and the docs say.

infra/: every YAML parses; the KubeRay RayCluster has GPU workers big enough for the paper's
stages and the RayJob runs `lladav pipeline run` on a pipeline of this repo; the Ray launcher
config passes Ray's own schema; MLflow runs on PostgreSQL with S3 artifacts and takes credentials
only from Secrets or the environment; Marquez runs on its own PostgreSQL and a pipeline's
`openlineage.url` can name its Service; no infra file holds a literal secret; the images the files
name are the ones infra/README.md documents. data_recipes/llada_v/ and stages/llada_v/: each
loads with lladav.config and carries the numbers of lladav_reference.md "Stages".
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

import lladav
from lladav.config import GEOMETRY_KEYS, load_recipe, load_stage

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
INFRA_YAMLS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
RECIPES = sorted((ROOT / "data_recipes" / "llada_v").glob("*.yaml"))
STAGES = sorted((ROOT / "stages" / "llada_v").glob("*.yaml"))
PLACEHOLDER = "s3://YOUR-BUCKET/"

ALL_TRAIN = {"vision_tower": 2e-6, "projector": 1e-5, "language_model": 1e-5}
# lladav_reference.md "Stages" (digest §4.1): learning rate per trained component, max length,
# global batch, and the per-device micro-batch of the released runs.
PAPER = {
    "stage1": ({"projector": 1e-3}, 8192, 64, 16),
    "stage2a": (ALL_TRAIN, 8192, 256, 1),
    "stage2b": (ALL_TRAIN, 16384, 256, 1),
    "stage3a": (ALL_TRAIN, 8192, 256, 1),
    "stage3b": (ALL_TRAIN, 16384, 256, 1),
}
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8}


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for p in INFRA_YAMLS for d in docs(p)
            if isinstance(d, dict) and "apiVersion" in d and d.get("kind") != "Kustomization"]


def one(kind: str) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under infra/, found {len(found)}"
    return found[0]


def named(kind: str, name: str) -> dict:
    (found,) = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def walk(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        yield obj
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            yield from walk(item)


def containers(doc: dict) -> list[dict]:
    return [c for d in walk(doc) for key in ("containers", "initContainers")
            for c in (d.get(key) or []) if isinstance(d.get(key), list)]


def quantity(q: str | int) -> float:
    return float(str(q)[:-1]) / 1000 if str(q).endswith("m") else float(q)


def stage_configs() -> dict[str, Any]:
    return {p.stem: load_stage(p) for p in STAGES}


def recipe_for(stage_stem: str) -> Path:
    (path,) = [p for p in RECIPES if p.stem.startswith(stage_stem + "_")]
    return path


# ---- infra files -----------------------------------------------------------------------------

def test_every_infra_yaml_parses():
    assert {p.relative_to(INFRA).parts[0] for p in INFRA_YAMLS} >= {"ray", "kuberay", "mlflow",
                                                                  "marquez"}
    for path in INFRA_YAMLS:
        assert docs(path), f"{path}: no YAML document"


def test_raycluster_has_gpu_workers_for_the_largest_stage():
    cluster = one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == metadata.version("ray")  # the pin in pyproject.toml
    head = containers(cluster["spec"]["headGroupSpec"])
    assert head and all(c.get("image") for c in head)
    need = max(s.scaling.workers * s.scaling.gpus_per_worker for s in stage_configs().values())
    capacity = 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        for c in containers(group):
            assert c.get("image"), f"worker group {group['groupName']}: a container has no image"
            gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            if not gpus:
                continue
            assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
            capacity += gpus * group["maxReplicas"]
            pod_cpus = quantity(c["resources"]["requests"]["cpu"])
            for name, stage in stage_configs().items():  # a node's share of each stage fits its pod
                per_node = min(stage.scaling.workers, gpus // stage.scaling.gpus_per_worker)
                assert per_node * stage.scaling.cpus_per_worker <= pod_cpus, name
    assert capacity >= need, f"the GPU groups hold {capacity} GPUs; the stages need {need}"


def _dockerfile_workdir() -> str:
    lines = (INFRA / "docker" / "Dockerfile").read_text().splitlines()
    return [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")][-1]


def test_rayjob_runs_a_pipeline_of_this_repo_on_the_raycluster():
    job, cluster = one("RayJob"), one("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["lladav", "pipeline", "run"] and len(argv) == 4
    assert (ROOT / argv[3]).is_file(), f"{argv[3]} is not a file of the repository"
    # The driver runs on the head in its working directory, the image's copy of the repository.
    (head,) = containers(cluster["spec"]["headGroupSpec"])
    assert head["workingDir"] == _dockerfile_workdir()
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert {c["image"] for c in containers(job)} == {head["image"]}


def test_ray_launcher_config_passes_rays_schema_and_installs_without_the_cpu_pin():
    import jsonschema

    spec = importlib.util.find_spec("ray")
    schema = json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" /
                         "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws" and config["docker"]["image"]
    gpu_nodes = [t for t in config["available_node_types"].values()
                 if t["node_config"]["InstanceType"] in GPUS_PER_INSTANCE]
    assert gpu_nodes, "no GPU node type"
    capacity = sum(GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]] * t["max_workers"]
                   for t in gpu_nodes)
    need = max(s.scaling.workers * s.scaling.gpus_per_worker for s in stage_configs().values())
    assert capacity >= need
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e " in setup and "constraints-cpu" not in setup


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_mlflow_server_uses_postgres_and_s3_and_serves_the_pipelines_uri():
    server = next(c for d in k8s_docs() if d["kind"] == "Deployment" for c in containers(d)
                  if "mlflow" in c.get("command", []) + c.get("args", [])[:1])
    argv = server["command"] + server["args"]
    assert argv[:2] == ["mlflow", "server"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in argv)
    store = _env(server)["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert store.startswith("postgresql://") and "$(POSTGRES_PASSWORD)" in store
    database = named("StatefulSet", "mlflow-postgres")
    assert [c["image"] for c in containers(database)][0].startswith("postgres:")
    # The database host in the URI is the Service in front of the StatefulSet.
    services = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Service"}
    assert urlparse(store.replace("$(", "").replace(")", "")).hostname in services
    # pipelines/llada_v.yaml's tracking URI is this Service, in the kustomization's namespace.
    pipeline = yaml.safe_load((ROOT / "pipelines" / "llada_v.yaml").read_text())
    uri = urlparse(pipeline["mlflow"]["tracking_uri"])
    name, namespace = uri.hostname.split(".")[:2]
    kustomization = yaml.safe_load((INFRA / "mlflow" / "kustomization.yaml").read_text())
    assert namespace == kustomization["namespace"]
    assert uri.port in [p["port"] for p in services[name]["spec"]["ports"]]


def test_mlflow_compose_uses_postgres_and_s3_from_the_environment():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    argv = services["mlflow"]["command"]
    assert argv[:2] == ["mlflow", "server"]
    assert any(a.startswith("--artifacts-destination=${") for a in argv)
    env = dict(e.split("=", 1) if "=" in e else (e, None)
               for e in services["mlflow"]["environment"])
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    for name, value in env.items():
        if SECRET_NAME.search(name):
            assert value is None, f"{name}: pass it through from the shell, do not set it here"
    for name, value in services["postgres"]["environment"].items():
        if SECRET_NAME.search(name):
            assert str(value).startswith("${"), name


def test_marquez_runs_on_its_postgres_and_a_pipeline_can_send_it_events():
    from lladav.config import parse_pipeline

    kustomization = yaml.safe_load((INFRA / "marquez" / "kustomization.yaml").read_text())
    (server,) = named("Deployment", "marquez")["spec"]["template"]["spec"]["containers"]
    assert server["image"].startswith("marquezproject/marquez:")
    env = {name: e.get("value") for name, e in _env(server).items()}
    # its config is marquez.yml from the generated ConfigMap, reading the database from the env
    mount = next(m for m in server["volumeMounts"]
                 if env["MARQUEZ_CONFIG"].startswith(m["mountPath"]))
    volume = next(v for v in named("Deployment", "marquez")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    (generated,) = [g for g in kustomization["configMapGenerator"]
                    if g["name"] == volume["configMap"]["name"]]
    assert [Path(f).name for f in generated["files"]] == [Path(env["MARQUEZ_CONFIG"]).name]
    config = yaml.safe_load((INFRA / "marquez" / "marquez.yml").read_text())
    assert (config["db"]["user"], config["db"]["password"]) == ("${POSTGRES_USER}",
                                                                "${POSTGRES_PASSWORD}")
    assert config["server"]["applicationConnectors"][0]["port"] == "${MARQUEZ_PORT:-5000}"
    # the database host is the Service in front of Marquez's own PostgreSQL StatefulSet
    database = named("StatefulSet", "marquez-postgres")
    assert env["POSTGRES_HOST"] == database["spec"]["serviceName"]
    assert named("Service", database["spec"]["serviceName"])
    # the UI reads the API Service; pipelines post to it at the URL infra/README.md gives
    api = named("Service", "marquez")
    assert int(env["MARQUEZ_PORT"]) in [p["port"] for p in api["spec"]["ports"]]
    (web,) = named("Deployment", "marquez-web")["spec"]["template"]["spec"]["containers"]
    assert _env(web)["MARQUEZ_HOST"]["value"] == api["metadata"]["name"]
    url = f"http://{api['metadata']['name']}.{kustomization['namespace']}.svc:{env['MARQUEZ_PORT']}"
    assert f"openlineage: {{url: {url}}}" in (INFRA / "README.md").read_text()
    pipe = parse_pipeline({"name": "p", "openlineage": {"url": url},
                           "steps": [{"name": "s", "kind": "synth", "output": "out"}]})
    assert pipe.openlineage.url == url
    # docker compose: the password from the shell; the API beside MLflow's :5000 on one host
    compose = yaml.safe_load((INFRA / "marquez" / "docker-compose.yaml").read_text())
    for service in ("postgres", "marquez"):
        assert compose["services"][service]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    mlflow = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    host_ports = lambda s: {p.split(":")[0] for p in s["ports"]}  # noqa: E731
    assert not host_ports(compose["services"]["marquez"]) & host_ports(mlflow["services"]["mlflow"])


SECRET_NAME = re.compile(r"(?i)(secret|password|passwd|token|access_key)")
_ASSIGNED = re.compile(r"(?i)(?<![\w.{-])[\w.-]*(password|secret_access_key|secret|token)[\w.-]*"
                       r"[ \t]*(?P<sep>[:=])[ \t]*(?P<value>[^\s,]+)")
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<value>[^@\s/]+)@")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_REFERENCE = ("$", "{", "\u2026", "...", "<")  # $VAR ${VAR} $(VAR), a {...} mapping, placeholders


def literal_secrets(text: str) -> list[str]:
    """Values that look like written-in credentials: an AWS key id, a password/secret/token
    assigned something other than a reference or a placeholder, or a password inside a URL.
    In comments only shell-style `NAME=value` counts (`Secrets: the ...` is prose)."""
    found = [m.group(0) for m in _AWS_KEY_ID.finditer(text)]
    for line in text.splitlines():
        comment = line.lstrip().startswith("#")
        for m in _ASSIGNED.finditer(line):
            if not (comment and m.group("sep") == ":") and \
                    not m.group("value").lstrip("\"'").startswith(_REFERENCE):
                found.append(m.group(0))
        found += [m.group(0) for m in _URL_PASSWORD.finditer(line)
                  if not m.group("value").startswith(_REFERENCE)]
    return found


@pytest.mark.parametrize("text, secret", [
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", True),
    ("POSTGRES_PASSWORD: hunter2hunter2", True),
    ("--backend-store-uri postgresql://mlflow:hunter2@db:5432/mlflow", True),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", True),
    ("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}", False),
    ("- DB_URI=postgresql://${USER}:${POSTGRES_PASSWORD:?set it}@db/mlflow", False),
    ("export POSTGRES_PASSWORD=... AWS_SECRET_ACCESS_KEY=...", False),
    ("# export POSTGRES_PASSWORD=hunter2hunter2", True),
    ("# Credentials only from Secrets: the database user", False),
    ("value: postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@mlflow-postgres/mlflow", False),
    ("secretKeyRef: {name: mlflow-postgres, key: password}", False),
    ('--from-literal=password="$MLFLOW_DB_PASSWORD"', False),
])
def test_the_secret_scan_tells_literals_from_references(text, secret):
    assert bool(literal_secrets(text)) is secret


def test_no_literal_credentials_in_any_infra_file():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".env")], "env files do not belong in infra/"
    for path in files:
        assert literal_secrets(path.read_text()) == [], path


def test_kubernetes_credentials_come_only_from_secrets():
    for doc in k8s_docs():
        for c in containers(doc):
            for name, entry in _env(c).items():
                if SECRET_NAME.search(name):
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (
                        f"{doc['kind']} {doc['metadata']['name']}: env {name} must come "
                        "from a Secret")


def _named_images() -> set[str]:
    images = {c["image"] for d in k8s_docs() for c in containers(d)}
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    images |= {s["image"] for s in compose["services"].values()}
    compose = yaml.safe_load((INFRA / "marquez" / "docker-compose.yaml").read_text())
    images |= {s["image"] for s in compose["services"].values()}
    launcher = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    images |= {launcher["docker"][k] for k in ("image", "head_image", "worker_image")
               if launcher["docker"].get(k)}
    return images


def test_images_are_the_ones_infra_readme_documents():
    readme = (INFRA / "README.md").read_text()
    built = dict(re.findall(r"^\| `([^`]+)` \| `(infra/docker/[^`]+)` \|", readme, re.M))
    assert built, "infra/README.md has no image table"
    images = _named_images()
    for image in images:
        assert f"`{image}`" in readme, f"{image} is used but infra/README.md does not name it"
        if image.startswith("YOUR-REGISTRY/"):
            assert image in built, f"{image}: infra/README.md does not say what builds it"
    for image, dockerfile in built.items():
        assert image in images and (ROOT / dockerfile).is_file(), image
    # Tags follow the versions they package.
    assert built[f"YOUR-REGISTRY/lladav:{lladav.__version__}"] == "infra/docker/Dockerfile"
    mlflow_version = metadata.version("mlflow")
    assert f"mlflow[db]=={mlflow_version}" in (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert f"YOUR-REGISTRY/lladav-mlflow:{mlflow_version}" in built


# ---- the paper's recipes and stages ----------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_with_siglip2_geometry_and_placeholder_uris(path):
    recipe = load_recipe(path)
    assert PLACEHOLDER in "".join(path.read_text().splitlines(keepends=True)[:2]), \
        "the header must tell the user to edit the placeholder URIs"
    uris = [recipe.tokenizer] + [u for s in recipe.sources for u in (s.location, s.image_root)]
    assert all(u.startswith(PLACEHOLDER) for u in uris), uris
    assert recipe.tokenizer.endswith("/LLaDA-8B-Instruct")
    v = recipe.vision
    assert (v.tile_size, v.patch_size, v.max_grid, v.max_tiles_area) == (384, 14, 6, 4)
    stage1 = path.stem.startswith("stage1_")
    assert recipe.template == ("llada_plain" if stage1 else "llava_llada")
    assert recipe.image_aspect == ("square" if stage1 else "anyres_max_4")


def test_stage3b_recipe_is_the_balanced_think_mix():
    recipe = load_recipe(recipe_for("stage3b"))
    tags = {s.tag: (s.tag_probability, s.weight) for s in recipe.sources}
    assert tags == {"/no_think": (1.0, 1.0), "/think": (0.5, 1.0)}


def test_there_is_a_stage_and_a_recipe_per_paper_stage():
    assert {p.stem for p in STAGES} == set(PAPER)
    assert all(recipe_for(stem) for stem in PAPER)


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_stage_has_the_papers_hyperparameters(stem):
    stage = stage_configs()[stem]
    rates, max_length, global_batch, micro_batch = PAPER[stem]
    assert stage.trainable.model_dump(exclude_none=True) == pytest.approx(rates)
    assert stage.max_length == max_length
    assert stage.micro_batch == micro_batch
    assert stage.micro_batch * stage.grad_accum * stage.scaling.workers == global_batch
    assert stage.scaling.gpus_per_worker >= 1
    assert (stage.epochs, stage.warmup_ratio, stage.weight_decay) == (1, 0.03, 0.0)
    assert (stage.betas, stage.adam_eps, stage.gradient_clipping) == ((0.9, 0.999), 1e-8, 1.0)
    assert stage.precision == "bf16" and stage.gradient_checkpointing
    assert stage.group_by_length == (stem != "stage1")
    assert (ROOT / stage.deepspeed).is_file()
    if stem == "stage1":
        assert stage.init.language_model.endswith("/LLaDA-8B-Instruct")
        assert "siglip2-so400m-patch14-384" in stage.init.vision_tower
    else:
        assert stage.init.export and stage.init.export.startswith(PLACEHOLDER)
    recipe = load_recipe(recipe_for(stem))
    assert recipe.max_length == stage.max_length
    # Image geometry has one owner, the recipe (checked against the paper above).
    stage_yaml = yaml.safe_load(next(p for p in STAGES if p.stem == stem).read_text())
    assert not set(GEOMETRY_KEYS) & set(stage_yaml)
    assert stage.end_of_answer.policy == "pad_to_longest"  # the reference's EOS padding


def test_pipeline_references_every_paper_recipe_and_stage():
    path = ROOT / "pipelines" / "llada_v.yaml"
    if not path.exists():
        pytest.skip("pipelines/llada_v.yaml is missing")
    steps = yaml.safe_load(path.read_text())["steps"]
    used = {(path.parent / s[k]).resolve() for s in steps for k in ("recipe", "stage") if k in s}
    assert all(p.is_file() for p in used)
    assert used >= {p.resolve() for p in RECIPES + STAGES}
