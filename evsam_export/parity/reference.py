"""What the parity comparison is fed: the cases of a suite and the PyTorch reference outputs for them.

`build_cases(suite, encoder_size)` turns a suite into images, preprocessed inputs and one `Case` per
image x prompt kind; `compute_reference` runs the PyTorch model on them (`pytorch_reference` first
rebuilds the model from a manifest's weights and checks their hash); `Reference.save`/`Reference.load`
keep a reference in an .npz file, so a machine without torch can validate against references computed
elsewhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.cache import RecentlyUsed, cache_key
from evsam_export.data.coco import AnnotationSet
from evsam_export.data.images import FolderImage, ImageFolder, SkippedImage, read_folder
from evsam_export.data.scenes import PromptSet, ValidationImage, annotated_validation_images, load_image_spec, prompts_for
from evsam_export.errors import ArtifactError, UsageError
from evsam_export.files import replacing
from evsam_export.manifest import Manifest
from evsam_export.model import processing
from evsam_export.model.checkpoint import exported_model
from evsam_export.model.variants import LOW_RES_MASK_SIZE
from evsam_export.parity.suites import Suite
from evsam_export.progress import Reporter

REFERENCE_FORMAT = "evsam-export/parity-reference-v1"


@dataclass
class Case:
    """One image x prompt kind, with everything both sides are fed."""

    image: ValidationImage
    kind: str
    prompts: PromptSet
    geometry: processing.ImageGeometry
    point_coords: np.ndarray
    point_labels: np.ndarray
    mask_input: np.ndarray  # [1,1,256,256] (zeros when unused)
    has_mask_input: np.ndarray  # [1]

    @property
    def key(self) -> str:
        return f"{self.image.name}/{self.kind}"


@dataclass
class CaseSet:
    """A suite's images in suite order, their preprocessed encoder inputs, and every case."""

    images: list[ValidationImage]
    inputs: dict[str, np.ndarray]  # image name -> [1,3,S,S] encoder input
    cases: list[Case]
    skipped: list[SkippedImage] = field(default_factory=list)  # unreadable files of the suite's folders


@dataclass
class Reference:
    """PyTorch outputs: input images and embeddings per image; all-token decoder outputs per case."""

    input_images: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    low_res: dict[str, np.ndarray] = field(default_factory=dict)  # case key -> [B,4,256,256]
    iou: dict[str, np.ndarray] = field(default_factory=dict)  # case key -> [B,4]
    mask_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # refine cases: the fed-back mask
    task: dict[str, np.ndarray] = field(default_factory=dict)  # prompt kind -> IoU per GT instance (parity.task)
    weights_sha256: str = ""
    source: str = ""  # where it came from, for the report: "PyTorch (synthetic:0)" or "file ref.npz"
    full_masks: dict = field(default_factory=dict)  # (case key, tokens) -> logits at original size (cache)

    def full_size(self, case: Case, tokens: list[int]) -> np.ndarray:
        """Reference logits at the original image size, post-processed once and shared by every stage."""
        key = (case.key, tuple(tokens))
        if key not in self.full_masks:
            self.full_masks[key] = processing.postprocess_masks(self.low_res[case.key][:, tokens], case.geometry)
        return self.full_masks[key]

    def save(self, path: Path, suite: Suite) -> None:
        arrays = {"__format__": np.array(REFERENCE_FORMAT), "__weights__": np.array(self.weights_sha256),
                  "__suite__": np.array(suite.name)}
        for prefix, table in (("image", self.input_images), ("emb", self.embeddings), ("low", self.low_res),
                              ("iou", self.iou), ("maskin", self.mask_inputs), ("task", self.task)):
            for key, value in table.items():
                arrays[f"{prefix}|{key}"] = value
        with replacing(Path(path), suffix=".npz") as temporary:  # np.savez adds .npz to a name without it
            np.savez_compressed(temporary, **arrays)

    @classmethod
    def load(cls, path: Path) -> Reference:
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(
                f"cannot read reference file {path} ({type(exc).__name__})", hint="re-create it with --save-reference"
            ) from exc
        if "__format__" not in data or str(data["__format__"]) != REFERENCE_FORMAT:
            raise ArtifactError(f"{path} is not an evsam-export parity reference", hint="create it with --save-reference")
        ref = cls(weights_sha256=str(data["__weights__"]), source=f"file {path}")
        tables = {"image": ref.input_images, "emb": ref.embeddings, "low": ref.low_res, "iou": ref.iou, "maskin": ref.mask_inputs,
                  "task": ref.task}
        for name in data.files:
            if "|" in name:
                prefix, key = name.split("|", 1)
                tables[prefix][key] = data[name]
        return ref


@dataclass
class SuiteReference:
    """A suite with its cases and their reference: computed once, compared against by many gates."""

    suite: Suite
    cases: CaseSet  # refine cases carry the reference's fed-back masks
    reference: Reference


def suite_images(suite: Suite, reporter: Reporter | None = None) -> tuple[list[ValidationImage], list[SkippedImage]]:
    """The suite's images in order, a folder or an annotation file expanded to its (sampled) files; an unreadable file of a folder
    is skipped with a `warning:` line and returned, never dropped silently. A folder with no readable image,
    or two images of one name, is refused (UsageError)."""
    images, skipped = [], []
    for spec in suite.images:
        if isinstance(spec, AnnotationSet):
            images.extend(annotated_validation_images(spec, prefix=f"{spec.name}/"))
            continue
        if not isinstance(spec, ImageFolder):
            images.append(load_image_spec(spec))
            continue
        readable = 0
        for item in read_folder(spec):
            if isinstance(item, FolderImage):
                readable += 1
                images.append(ValidationImage(name=f"{spec.name}/{item.name}", rgb=item.rgb, masks=None, source=str(item.path)))
            else:
                skipped.append(SkippedImage(f"{spec.name}/{item.name}", item.reason))
                if reporter is not None:
                    reporter.line(f"warning: {item.reason} (skipped; counted in the report)")
        if not readable:
            raise UsageError(f"no readable image in {spec.folder} ({len(skipped)} unreadable)",
                             hint="check the files with an image viewer, or point at another folder")
    names = [image.name for image in images]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"suite {suite.name!r} has two images named {twice[0]!r}", hint="list each image or folder once")
    return images, skipped


def build_cases(suite: Suite, encoder_size: int, reporter: Reporter | None = None) -> CaseSet:
    images, inputs, cases = [], {}, []
    loaded, skipped = suite_images(suite, reporter)
    for image in loaded:
        images.append(image)
        input_image, geometry = processing.preprocess_image(image.rgb, encoder_size)
        inputs[image.name] = input_image
        for index, kind in enumerate(suite.prompt_kinds):
            prompts = prompts_for(kind, image.rgb, image.masks, seed=suite.prompt_seed + index, gt_boxes=image.boxes)
            tokens = processing.build_prompt_tokens(geometry, prompts.points, prompts.labels, prompts.boxes)
            cases.append(
                Case(
                    image=image,
                    kind=kind,
                    prompts=prompts,
                    geometry=geometry,
                    point_coords=tokens.point_coords,
                    point_labels=tokens.point_labels,
                    mask_input=np.zeros((1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), np.float32),
                    has_mask_input=np.zeros((1,), np.float32),
                )
            )
    return CaseSet(images, inputs, cases, skipped)


def decoder_feeds(case: Case, embeddings: np.ndarray, artifact_inputs) -> dict[str, np.ndarray]:
    """The contract's decoder feeds for `case`, for the graph whose inputs are `artifact_inputs`."""
    return contract.decoder_feeds(
        artifact_inputs,
        image_embeddings=embeddings,
        point_coords=case.point_coords,
        point_labels=case.point_labels,
        mask_input=case.mask_input,
        has_mask_input=case.has_mask_input,
        original_size=case.geometry.original_size,
    )


def selected_token(iou: np.ndarray, multimask: bool) -> np.ndarray:
    """PyTorch SAM usage: multimask -> best of tokens 1..3 by predicted IoU; else token 0. Per prompt set."""
    if not multimask:
        return np.zeros(iou.shape[0], dtype=np.int64)
    return 1 + np.argmax(iou[:, 1:], axis=1)


def apply_refine(case: Case, mask_input: np.ndarray) -> None:
    case.mask_input = mask_input.astype(np.float32)
    case.has_mask_input = np.ones((1,), np.float32)


def compute_reference(model, variant, cases: CaseSet, reporter: Reporter, weights_sha256: str, source: str) -> Reference:
    """PyTorch outputs for every case; refine cases get the fed-back mask applied (they are changed)."""
    from evsam_export.runners.torch_runner import torch_reference_runners

    encoder, decoder = torch_reference_runners(model, variant, decoder_profile="tensorrt")
    ref = Reference(weights_sha256=weights_sha256, source=source)
    with encoder, decoder:
        for image in reporter.track(cases.images, "PyTorch reference: encoder"):
            ref.input_images[image.name] = cases.inputs[image.name]
            ref.embeddings[image.name] = encoder.infer({"input_image": cases.inputs[image.name]})["image_embeddings"]
        for case in reporter.track(cases.cases, "PyTorch reference: decoder"):
            out = decoder.infer(decoder_feeds(case, ref.embeddings[case.image.name], decoder.inputs))
            if case.prompts.refine:
                # Second pass fed with the first pass's selected low-res mask, as an interactive app does.
                token = selected_token(out["iou_predictions"], case.prompts.multimask)[0]
                ref.mask_inputs[case.key] = out["low_res_masks"][:1, token : token + 1]
                apply_refine(case, ref.mask_inputs[case.key])
                out = decoder.infer(decoder_feeds(case, ref.embeddings[case.image.name], decoder.inputs))
            ref.low_res[case.key] = out["low_res_masks"]
            ref.iou[case.key] = out["iou_predictions"]
    return ref


# References this process computed, by weights and cases: cpu-auto's candidates and the gate of the pair it
# recommends share one export, so they share its reference. Each holds every case's logits: keep a few.
REFERENCES_KEPT = 2
_COMPUTED = RecentlyUsed(REFERENCES_KEPT)


def cases_key(cases: CaseSet) -> str:
    """The encoder inputs and prompts of `cases` (refine cases as built, before a reference feeds their mask back)."""
    digest = hashlib.sha256()
    for image in cases.images:
        digest.update(image.name.encode())
        digest.update(np.ascontiguousarray(cases.inputs[image.name]).tobytes())
    for case in cases.cases:
        digest.update(case.key.encode())
        for array in (case.point_coords, case.point_labels, case.mask_input, case.has_mask_input):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def pytorch_reference(manifest: Manifest, folder: Path, cases: CaseSet, reporter: Reporter,
                      checkpoint: str | None = None, with_model=None) -> Reference:
    """The reference computed by the PyTorch model of model.checkpoint.exported_model on every case.
    `with_model(model, variant, reference)` runs before the model is freed: parity.task.task_reference adds
    the ground-truth IoUs of a suite with a [task] that way (this module stays below the evaluate protocol).
    Without `with_model`, a reference this process computed for the same weights, checkpoint and cases is
    used again (refine cases get its fed-back masks)."""
    key = None
    if with_model is None and manifest.weights.get("sha256"):
        key = cache_key({"variant": manifest.variant, "weights": manifest.weights["sha256"], "checkpoint": checkpoint,
                         "cases": cases_key(cases)})
        reference = _COMPUTED.get(key)
        if reference is not None:
            for case in cases.cases:
                if case.key in reference.mask_inputs:
                    apply_refine(case, reference.mask_inputs[case.key])
            return reference
    model, variant, weights, source = exported_model(manifest, folder, reporter, checkpoint)
    reference = compute_reference(model, variant, cases, reporter, weights.sha256, source)
    if with_model is not None:
        with_model(model, variant, reference)
    _COMPUTED.put(key, reference)
    return reference


def saved_reference(path: Path, manifest: Manifest, folder: Path, suite: Suite, cases: CaseSet) -> Reference:
    """A reference loaded from `path`, checked against the export's weights and the suite's cases;
    refine cases get the saved fed-back mask applied (they are changed)."""
    ref = Reference.load(path)
    if ref.weights_sha256 != manifest.weights["sha256"]:
        raise ArtifactError(
            f"reference {path} was computed from other weights than {folder}",
            hint="save the reference from the same checkpoint as the export",
        )
    missing = [c.key for c in cases.cases if c.key not in ref.low_res]
    if missing:
        raise ArtifactError(f"reference {path} lacks case {missing[0]}", hint=f"save it with --suite {suite.name}")
    if suite.task is not None and any(kind not in ref.task for kind in suite.task.kinds):
        raise ArtifactError(f"reference {path} lacks the PyTorch mIoU on the ground truth",
                            hint="save it with the same --annotations (or the suite with [task])")
    for case in cases.cases:
        if case.key in ref.mask_inputs:
            apply_refine(case, ref.mask_inputs[case.key])
    return ref
