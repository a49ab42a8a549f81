"""One image through the model as the pipeline feeds it, results at the image's own size.

The model sees an image as training saw it (`prepare` resizes every image so that its longer
side is at most `data.max_size`, never upscaling); masks and boxes come back at the original
size as COCO results. `jobs/predict_pep.py` (`pipeline.predict`) and the logged MLflow model
(`pipeline.tracking.PEPPyfunc`) both predict through `predict_image`, so they agree. Imports no
Ray: the logged model runs without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.coco import resized_size
from pipeline.evaluate import predictions_to_coco_results


def predict_image(
    model: torch.nn.Module,
    image: Image.Image,
    max_size: int,
    image_id: int = 1,
    to_category: Mapping[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO results of an RGB image at its original size, and the contiguous label of each.

    `to_category` maps contiguous labels to result `category_id`s (default: the label itself).
    """
    size = resized_size(image.width, image.height, max_size)
    resized = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)
    with torch.inference_mode():
        (prediction,) = model([tensor.to(device)])  # masks K x h x w at the resized size
    prediction = {k: v.cpu() for k, v in prediction.items()}
    labels = [int(label) for label in prediction["labels"]]
    results = predictions_to_coco_results(
        [prediction],
        [image_id],
        [(image.height, image.width)],
        {label: label for label in labels} if to_category is None else to_category,
    )
    return results, labels
