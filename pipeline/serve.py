"""The PEP model behind HTTP with Ray Serve, following the MLflow registry's `@champion`.

    serve run pipeline.serve:app_builder model=models:/pep@champion tracking_uri=http://...
    python jobs/serve_pep.py --model models:/pep@champion --port 8000

One deployment (`PEPDeployment`) answers:

- `POST /predict`: an image (JPEG/PNG/TIFF; the raw bytes, or multipart/form-data with one
  file) -> the image's COCO results as `jobs/predict_pep.py` writes them (one entry per
  instance: image_id, category_id, category_name, score, bbox xywh, segmentation as COCO
  compressed RLE at the image's original size; the model sees it resized as in training).
  Query parameters `score_threshold` and `max_instances` (the logged pyfunc's params; default:
  the checkpoint's own), `format=png` for the overlay picture instead of JSON.
- `GET /healthz`, `GET /model` (what is served: URI, registry version, run id, data
  fingerprint, weights hash, device, and the last failed load), `GET /` (a page to try it).

Every answer names the version that gave it (`X-Model-Version`, `X-Model-Run-Id`,
`X-Model-Weights` headers; one log line per batch). Requests are batched into one forward
pass by `@serve.batch` (images of one padded size and the same params share a pass, so an
answer does not depend on its batch-mates); bad input is refused with a 4xx before it reaches
the model. Serve's own `max_ongoing_requests` and `max_queued_requests` bound the work in
flight: beyond them the proxy answers 503 ("Request dropped due to backpressure").

Following the registry: when the source is an alias URI (`models:/<name>@<alias>`), each
replica looks the alias up every `poll_interval_s` in a background thread. When it moved, the
new version is downloaded and loaded beside the old one, then swapped in between two
batches: requests keep being answered throughout. A failed load keeps the old version,
logs the error and shows it in `/model` (`last_failed_load`); it is retried after
`retry_failed_s`, or at once when the alias moves again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import logging
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from pipeline.coco import resized_size, to_rgb
from pipeline.evaluate import predictions_to_coco_results
from pipeline.predict import (
    ModelSourceError,
    _overlay,
    _tracking_uri,
    is_mlflow_uri,
    resolve_model_source,
)
from pipeline.serve_page import PAGE

logger = logging.getLogger("ray.serve")  # Serve's replica logger: the replica's log file

DEFAULT_MODEL = "models:/pep@champion"
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "TIFF")  # PIL's names; MPO: a JPEG from a camera
# raw bodies; x-www-form-urlencoded is what `curl --data-binary @image.jpg` sends by default
RAW_CONTENT_TYPES = (
    "image/jpeg",
    "image/png",
    "image/tiff",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "",
)
MULTIPART = "multipart/form-data"
ACCEPTED = (
    "send the image's bytes (JPEG, PNG or TIFF) with Content-Type image/jpeg, image/png, "
    "image/tiff or application/octet-stream, or multipart/form-data with one file"
)


class ServeOptions(BaseModel):
    """What the application serves and how (`serve run pipeline.serve:app_builder k=v ...`)."""

    model: str = Field(DEFAULT_MODEL, description="model source (see pipeline.predict)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/...")
    use_gpu: str = Field("auto", description="auto|true|false: one GPU per replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs (and torch threads) per replica")
    max_batch_size: int = Field(8, ge=1, description="images per forward pass at most")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait to fill a batch")
    max_ongoing_requests: int = Field(16, ge=1, description="requests a replica holds")
    max_queued_requests: int = Field(64, ge=1, description="waiting beyond those: then 503")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target")
    poll_interval_s: float = Field(10.0, gt=0, description="registry alias look-up period")
    retry_failed_s: float = Field(60.0, ge=0, description="retry a failed version after")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images: 413")
    max_request_bytes: int = Field(64 * 2**20, ge=1, description="larger bodies: 413")


# ------------------------------------------------------------------------------ model source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(source: str, tracking_uri: str | None) -> dict[str, Any]:
    """Registry facts of a model source, without downloading it: {uri (pinned: an alias
    becomes its version), name, version, alias, run_id, data_fingerprint}. Non-MLflow sources
    give only `uri`. Raises ModelSourceError (unknown model, alias, version or run)."""
    info: dict[str, Any] = {"uri": source, "name": None, "version": None, "alias": None}
    info.update(run_id=None, data_fingerprint=None)
    if not is_mlflow_uri(source):
        return info
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    try:
        if source.startswith("models:/"):
            _describe_models_uri(source, client, info)
        elif source.startswith("runs:/"):
            info["run_id"] = source[len("runs:/") :].strip("/").split("/")[0]
            client.get_run(info["run_id"])  # raises when unknown
        if info["run_id"] and not info["data_fingerprint"]:
            run = client.get_run(info["run_id"])
            info["data_fingerprint"] = run.data.tags.get("data_fingerprint")
    except MlflowException as e:
        raise ModelSourceError(
            f"{source}: not found in the MLflow store {tracking_uri}: {e.message}"
        ) from e
    return info


def _describe_models_uri(source: str, client: Any, info: dict[str, Any]) -> None:
    head, _, rest = source[len("models:/") :].strip("/").partition("/")
    if head.startswith("m-"):  # a logged model id
        info["run_id"] = client.get_logged_model(head).source_run_id
        return
    if "@" in head:
        name, alias = head.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
        info["alias"] = alias
    elif rest.isdigit():
        name, version = head, client.get_model_version(head, rest)
    elif rest.lower() == "latest":
        name = head
        number = max(int(v.version) for v in client.get_latest_versions(head))
        version = client.get_model_version(head, str(number))
    else:
        raise ModelSourceError(
            f"{source}: expected models:/m-<id>, models:/<name>@<alias>, "
            "models:/<name>/<version number> or models:/<name>/latest"
        )
    info.update(name=name, version=str(version.version), uri=f"models:/{name}/{version.version}")
    info["run_id"] = version.run_id or version.tags.get("source_run_id")
    info["data_fingerprint"] = version.tags.get("data_fingerprint")


def check_model_source(source: str, tracking_uri: str | None) -> dict[str, Any]:
    """Fail early, with the reason, on a source that cannot be served (unknown registry
    name/alias/version/run, missing local checkpoint); remote checkpoints are left to the
    replicas. Returns `describe_source`."""
    if is_mlflow_uri(source):
        return describe_source(source, tracking_uri)
    if not str(source).startswith(("s3://", "gs://", "hdfs://")):
        resolve_model_source(source)  # a local file or folder: read in place, nothing copied
    return describe_source(source, tracking_uri)


@dataclass
class Served:
    """One loaded model and what it is: swapped whole when the registry moves."""

    model: torch.nn.Module
    max_size: int
    defaults: dict[str, Any]  # the checkpoint's score_threshold and max_instances
    categories: dict[int, str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        info = self.info
        return {
            "X-Model-Version": str(info.get("version") or "unregistered"),
            "X-Model-Uri": str(info.get("uri")),
            "X-Model-Run-Id": str(info.get("run_id") or ""),
            "X-Model-Weights": f"sha256:{info['weights_sha256'][:16]}",
        }

    @property
    def label(self) -> str:
        info = self.info
        if info.get("version"):
            return f"{info['name']} version {info['version']}"
        return f"{info['uri']} (sha256:{info['weights_sha256'][:16]})"


def load_served(source: str, tracking_uri: str | None, device: torch.device) -> Served:
    """Download (registry aliases pinned to their version first) and load a model source."""
    from pipeline.inference import load_model

    info = describe_source(source, tracking_uri)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pep-serve-") as tmp:
        checkpoint, categories = resolve_model_source(info["uri"], tracking_uri, dst_dir=tmp)
        model, config = load_model(checkpoint, device=device)
        info["weights_sha256"] = _sha256(checkpoint)
    info.update(
        source=source,
        device=str(device),
        loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        load_s=round(time.monotonic() - start, 2),
    )
    names = categories or {k: str(k) for k in range(1, config.model.num_classes + 1)}
    defaults = {
        "score_threshold": float(config.model.score_threshold),
        "max_instances": int(config.model.max_instances),
    }
    return Served(model, config.data.max_size, defaults, names, info)


# ------------------------------------------------------------------------------ requests


class BadInput(Exception):
    """A request the server refuses: HTTP `status` and a message saying why and what to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_params(query: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """score_threshold (0..1), max_instances (>= 1) and format (json|png) from the query."""
    params = dict(defaults)
    if "score_threshold" in query:
        try:
            params["score_threshold"] = float(query["score_threshold"])
        except ValueError:
            params["score_threshold"] = float("nan")
        if not 0.0 <= params["score_threshold"] <= 1.0:
            raise BadInput(400, f"score_threshold must be a number in 0..1, got "
                                f"{query['score_threshold']!r}")  # fmt: skip
    if "max_instances" in query:
        value = query["max_instances"]
        if not value.isdigit() or int(value) < 1:
            raise BadInput(400, f"max_instances must be an integer >= 1, got {value!r}")
        params["max_instances"] = int(value)
    params["format"] = query.get("format", "json").lower()
    if params["format"] not in ("json", "png"):
        raise BadInput(400, f"format must be json or png, got {query['format']!r}")
    return params


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a request (raw body or the one file of a multipart form), reading
    at most `max_bytes`; BadInput for an empty body, a wrong content type or a large body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != MULTIPART and content_type not in RAW_CONTENT_TYPES:
        raise BadInput(415, f"unsupported Content-Type {content_type!r}: {ACCEPTED}")
    declared = request.headers.get("content-length")
    too_large = f"request body over {max_bytes} bytes (max_request_bytes)"
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BadInput(413, too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BadInput(413, too_large)
    if content_type == MULTIPART:
        body = await _multipart_file(request, bytes(body))
    if not body:
        raise BadInput(400, f"empty request body: {ACCEPTED}")
    return bytes(body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception as e:  # noqa: BLE001 - python-multipart's errors vary by version
        raise BadInput(400, f"unreadable multipart/form-data body: {e}") from e
    files = [value for value in form.values() if hasattr(value, "read")]
    if not files:
        raise BadInput(400, f"the multipart form has no file: {ACCEPTED}")
    return await files[0].read()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image of uploaded bytes (grayscale, RGBA, 16-bit converted). Its size is read
    from the header first: an image over `max_pixels` is refused before its pixels are
    decoded. BadInput (400/413/415) names the reason."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadInput(413, f"image too large: {e} (at most {max_pixels} pixels)") from e
    except UnidentifiedImageError as e:
        raise BadInput(400, f"not an image: {len(data)} bytes in no image format") from e
    except (OSError, ValueError) as e:
        raise BadInput(400, f"not a readable image ({len(data)} bytes): {e}") from e
    if image.format not in IMAGE_FORMATS:
        raise BadInput(415, f"{image.format} images are not served: send JPEG, PNG or TIFF")
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(
            413,
            f"image of {width} x {height} pixels ({width * height / 1e6:.0f} MP) is over the "
            f"{max_pixels / 1e6:g} MP this server decodes (max_image_pixels); resize it first",
        )
    try:
        image.load()  # raises on truncated or corrupt data
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad pixel data
        raise BadInput(400, f"truncated or corrupt {image.format} data: {e}") from e


# ------------------------------------------------------------------------------ batches


@dataclass
class Item:
    """One request inside a batch: its RGB image and post-processing params."""

    image: Image.Image
    score_threshold: float
    max_instances: int


def padded_size(width: int, height: int, max_size: int, divisor: int) -> tuple[int, int]:
    """The model input's padded (width, height): images of one padded size batch exactly as
    they would run alone (`pep_model.pep.batch_images`)."""
    w, h = resized_size(width, height, max_size)
    return -(-w // divisor) * divisor, -(-h // divisor) * divisor


def predict_batch(served: Served, items: list[Item]) -> list[list[dict[str, Any]]]:
    """COCO results (image_id 1, at each image's original size, `category_name` added) for
    each item, in order. One forward pass per group of equal params and padded size."""
    model = served.model
    device = next(model.parameters()).device
    divisor = int(model.size_divisibility)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        size = padded_size(item.image.width, item.image.height, served.max_size, divisor)
        groups[(item.score_threshold, item.max_instances, size)].append(index)
    answers: list[list[dict[str, Any]]] = [[] for _ in items]
    for (score_threshold, max_instances, _), indices in groups.items():
        model.set_inference_params(score_threshold=score_threshold, max_instances=max_instances)
        tensors = []
        for index in indices:
            image = items[index].image
            size = resized_size(image.width, image.height, served.max_size)
            resized = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
            tensor = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
            tensors.append(tensor.float().div_(255.0).to(device))  # 3 x h x w in 0..1
        with torch.inference_mode():
            predictions = model(tensors)
        for index, prediction in zip(indices, predictions):
            image = items[index].image
            prediction = {k: v.cpu() for k, v in prediction.items()}
            labels = [int(label) for label in prediction["labels"]]
            results = predictions_to_coco_results(
                [prediction], [1], [(image.height, image.width)], {k: k for k in labels}
            )
            for result in results:
                result["category_name"] = served.categories.get(
                    result["category_id"], str(result["category_id"])
                )
            answers[index] = results
    return answers


def render_overlay(image: Image.Image, results: list[dict[str, Any]], served: Served) -> bytes:
    """The overlay PNG of `jobs/predict_pep.py` for one answer."""
    labels = [r["category_id"] for r in results]
    out = io.BytesIO()
    _overlay(image, results, labels, served.categories).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------ deployment


@serve.deployment
class PEPDeployment:
    """A replica: one loaded model (swapped when the registry alias moves), batched."""

    def __init__(self, options: ServeOptions):
        from pipeline.devices import local_device

        self.options = options
        torch.set_num_threads(max(1, int(options.num_cpus)))
        self.device = local_device(options.use_gpu, "serving")
        self.served = load_served(options.model, options.tracking_uri, self.device)
        logger.info("serving %s on %s", self.served.label, self.device)
        self.last_failed_load: dict[str, Any] | None = None
        self.predict.set_max_batch_size(options.max_batch_size)
        self.predict.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        # forward passes run here, one at a time, off the event loop
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pep-infer")
        self.stop = threading.Event()
        self.follows = self.served.info.get("alias") is not None
        if self.follows:
            threading.Thread(target=self._follow, name="pep-registry", daemon=True).start()

    def __del__(self):
        self.stop.set()

    # ---------------------------------------------------------------- the registry

    def _follow(self) -> None:
        while not self.stop.wait(self.options.poll_interval_s):
            try:
                self.check_registry()
            except Exception as e:  # noqa: BLE001 - the poller must outlive any error
                logger.warning("registry look-up of %s failed: %s", self.options.model, e)

    def check_registry(self) -> bool:
        """Load and swap in the alias's version when it moved; True when it switched."""
        target = describe_source(self.options.model, self.options.tracking_uri)["version"]
        current = self.served.info["version"]
        failed = self.last_failed_load
        if target == current:
            self.last_failed_load = None  # the alias is back on the served version
            return False
        if failed and failed["version"] == target:
            if time.monotonic() - failed["monotonic"] < self.options.retry_failed_s:
                return False
        logger.info("%s moved to version %s: loading it", self.options.model, target)
        try:
            served = load_served(self.options.model, self.options.tracking_uri, self.device)
        except Exception as e:  # noqa: BLE001 - whatever broke, the old version keeps serving
            self.last_failed_load = {
                "version": target,
                "error": f"{type(e).__name__}: {e}",
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "monotonic": time.monotonic(),
            }
            logger.error(
                "could not load %s version %s (%s); still serving %s",
                self.options.model, target, self.last_failed_load["error"], self.served.label,
            )  # fmt: skip
            return False
        previous, self.served = self.served, served  # batches take the model at their start
        self.last_failed_load = None
        logger.info("switched from %s to %s (loaded in %.1f s)",
                    previous.label, served.label, served.info["load_s"])  # fmt: skip
        return True

    def describe(self) -> dict[str, Any]:
        info = {k: v for k, v in self.served.info.items()}
        failed = self.last_failed_load
        return {
            **info,
            "follows": self.options.model if self.follows else None,
            "poll_interval_s": self.options.poll_interval_s if self.follows else None,
            "defaults": self.served.defaults,
            "max_image_pixels": self.options.max_image_pixels,
            "last_failed_load": failed and {k: v for k, v in failed.items() if k != "monotonic"},
        }

    # ---------------------------------------------------------------- requests

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[Item]) -> list[tuple[list[dict[str, Any]], Served]]:
        served = self.served  # one model version for the whole batch
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(self.executor, predict_batch, served, items)
        logger.info("batch of %d image(s) answered by %s in %.0f ms",
                    len(items), served.label, 1000 * (time.monotonic() - start))  # fmt: skip
        return [(answer, served) for answer in answers]

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {
            "/predict": ("POST", self._predict),
            "/healthz": ("GET", self._healthz),
            "/model": ("GET", self._model),
            "/": ("GET", self._page),
        }
        if path not in routes:
            return JSONResponse({"error": f"no such endpoint {path}"}, status_code=404)
        allowed, handler = routes[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            return JSONResponse(
                {"error": f"{path} takes {allowed}, not {method}"},
                status_code=405,
                headers={"Allow": allowed},
            )
        return await handler(request)

    async def _predict(self, request: Request) -> Response:
        served = self.served
        try:
            params = parse_params(request.query_params, served.defaults)
            data = await read_upload(request, self.options.max_request_bytes)
            image = await asyncio.to_thread(decode_image, data, self.options.max_image_pixels)
        except BadInput as e:
            logger.info("refused a /predict request (%d): %s", e.status, e.message)
            return JSONResponse({"error": e.message}, status_code=e.status)
        item = Item(image, params["score_threshold"], params["max_instances"])
        results, served = await self.predict(item)
        if params["format"] == "png":
            png = await asyncio.to_thread(render_overlay, image, results, served)
            return Response(png, media_type="image/png", headers=served.headers)
        return JSONResponse(results, headers=served.headers)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model_version": self.served.info.get("version")})

    async def _model(self, request: Request) -> Response:
        return JSONResponse(self.describe(), headers=self.served.headers)

    async def _page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)


# ------------------------------------------------------------------------------ application


def resolve_options(options: ServeOptions) -> ServeOptions:
    """Options as the replicas need them: the tracking URI fixed here (replicas run in other
    folders), the model source checked (ModelSourceError with the reason)."""
    tracking_uri = options.tracking_uri
    if is_mlflow_uri(options.model):
        tracking_uri = _tracking_uri(tracking_uri, options.model)
    elif not str(options.model).startswith(("s3://", "gs://", "hdfs://")):
        options = options.model_copy(update={"model": str(Path(options.model).resolve())})
    options = options.model_copy(update={"tracking_uri": tracking_uri})
    if options.max_replicas < options.min_replicas:
        raise ValueError(
            f"max_replicas ({options.max_replicas}) < min_replicas ({options.min_replicas})"
        )
    check_model_source(options.model, tracking_uri)
    return options


def build_app(options: ServeOptions) -> serve.Application:
    """The Serve application for `options` (checked first: see `resolve_options`)."""
    from pipeline.devices import resolve_use_gpu

    options = resolve_options(options)
    scaling: dict[str, Any] = {"num_replicas": options.min_replicas}
    if options.max_replicas > options.min_replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    deployment = PEPDeployment.options(
        ray_actor_options={
            "num_cpus": options.num_cpus,
            "num_gpus": 1 if resolve_use_gpu(options.use_gpu) else 0,
        },
        max_ongoing_requests=max(options.max_ongoing_requests, options.max_batch_size),
        max_queued_requests=options.max_queued_requests,
        **scaling,
    )
    return deployment.bind(options)


def app_builder(args: dict[str, Any] | ServeOptions) -> serve.Application:
    """`serve run pipeline.serve:app_builder model=... tracking_uri=...` (and `serve deploy`
    configs: `import_path: pipeline.serve:app_builder`, `args: {model: ...}`): the args are
    `ServeOptions` fields, validated (Serve passes them as a dict of strings)."""
    if not isinstance(args, ServeOptions):
        args = ServeOptions.model_validate(args)
    return build_app(args)
