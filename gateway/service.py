"""Generation: checks against the served model, Triton calls, encoding, the response."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL.Image import Image as PILImage

from sd_triton import contract as c
from sd_triton.contract import DEFAULT_DENOISING_END, DEFAULT_STRENGTH
from sd_triton.gateway.backend import TritonBackend
from sd_triton.gateway.cache import ResultCache, cache_key
from sd_triton.gateway.errors import InvalidRequestError
from sd_triton.gateway.images import (
    CONTENT_TYPES,
    ImageEncoder,
    control_map,
    init_pixels,
    mask_pixels,
    open_image,
)
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.routing import pick
from sd_triton.gateway.schemas import (
    ComponentProvenance,
    ControlNetRef,
    GenerateResponse,
    GenerationOptions,
    Image,
    LoraRef,
    Provenance,
    SchedulerProvenance,
    Timings,
    Truncation,
)
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.prompts import PromptSyntaxError
from sd_triton.prompts import parse as parse_prompt
from sd_triton.requests import GenerationParams, InvalidRequest, start_step, validate_params
from sd_triton.served_model import ServedModel
from sd_triton.txt2img_client import Progress, Txt2ImgResult

# awaited after every denoising step of a streamed generation (async jobs)
ProgressCallback = Callable[[Progress], Awaitable[None]]
SEED_RANGE = 2**32  # drawn seeds stay in the range every UI and diffusers script accepts


@dataclass(frozen=True)
class Job:
    """One Triton call: a prompt and its checked parameters (seed: its first image's)."""

    prompt: str
    params: GenerationParams
    # an SDXL model's size conditioning, as txt2img_inputs takes it (size_conditioning, and
    # negative_size_conditioning when the request set it; a refiner's aesthetic scores); empty for SD
    conditioning: dict[str, Any] = dataclasses.field(default_factory=dict)


SIZE_FIELDS = ("original_size", "crops_coords_top_left", "target_size")  # diffusers' names, in time-id order
AESTHETIC_FIELDS = ("aesthetic_score", "negative_aesthetic_score")  # an SDXL refiner's


def size_conditioning(
    request: GenerationOptions, served: ServedModel, height: int, width: int
) -> dict[str, Any]:
    """An SDXL request's SIZE_CONDITIONING (diffusers' defaults filled: the request's size, no crop) and,
    when it set the negative fields, NEGATIVE_SIZE_CONDITIONING, and a refiner's aesthetic scores when
    set; {} for an SD model, which refuses them."""
    scores = {name: getattr(request, name) for name in AESTHETIC_FIELDS}
    for name, score in scores.items():
        if score is not None and served.architecture != "sdxl-refiner":
            what = f"{served.model} is {served.architecture}"
            raise InvalidRequestError(f"{name}: applies to SDXL refiner models only; {what}", field=name)
    fields = {
        name: getattr(request, name) for name in (*SIZE_FIELDS, *(f"negative_{n}" for n in SIZE_FIELDS))
    }
    if not served.xl:
        for name, value in fields.items():
            if value is not None:
                raise InvalidRequestError(
                    f"{name}: applies to SDXL models only; {served.model} is {served.architecture}",
                    field=name,
                )
        return {}
    for name, value in fields.items():  # sizes, not crops, must be positive
        if value is not None and "size" in name and min(value) < 1:
            raise InvalidRequestError(f"{name}: both sides must be >= 1, got {list(value)}", field=name)
    size = (height, width)
    original, crop, target = (fields[n] for n in SIZE_FIELDS)
    params = {"size_conditioning": [*(original or size), *(crop or (0, 0)), *(target or size)]}
    negative = [fields[f"negative_{n}"] for n in SIZE_FIELDS]
    if any(value is not None for value in negative):  # diffusers takes them only as a pair of sizes
        for name, value in (("negative_original_size", negative[0]), ("negative_target_size", negative[2])):
            if value is None:
                raise InvalidRequestError(
                    f"{name}: required with the other negative size fields (diffusers uses the negative size "
                    "conditioning only when negative_original_size and negative_target_size are both set)",
                    field=name,
                )
        params["negative_size_conditioning"] = [*negative[0], *(negative[1] or (0, 0)), *negative[2]]
    return {**params, **{name: score for name, score in scores.items() if score is not None}}


@dataclass(frozen=True)
class InitImage:
    """An image-to-image or inpainting request's images: opened and checked (`open_image`), then as sent
    to Triton (`sized`)."""

    opened: PILImage
    opened_mask: PILImage | None = None
    pixels: np.ndarray[Any, Any] | None = None  # uint8 [height, width, 3], at `plan`'s size
    mask: np.ndarray[Any, Any] | None = None  # uint8 [height, width]

    @property
    def mode(self) -> str:
        return "inpainting" if self.opened_mask is not None else "image-to-image"

    def sized(self, width: int, height: int) -> InitImage:
        """The images at the request's size (off the event loop: resizing takes a while)."""
        mask = None if self.opened_mask is None else mask_pixels(self.opened_mask, width, height)
        return dataclasses.replace(self, pixels=init_pixels(self.opened, width, height), mask=mask)

    def backend_params(self) -> dict[str, Any]:
        """The backend's `image` (and `mask`) arguments."""
        return {"image": self.pixels} if self.mask is None else {"image": self.pixels, "mask": self.mask}

    @property
    def digest(self) -> str | None:
        """The pixels' hash (with their shapes, the mask's too), for the result cache's key."""
        if self.pixels is None:
            return None
        digest = hashlib.sha256(repr(self.pixels.shape).encode() + self.pixels.tobytes())
        if self.mask is not None:
            digest.update(b"mask" + repr(self.mask.shape).encode() + self.mask.tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Refine:
    """A base + refiner request's second half: the refiner, the fraction where the base hands off, and the
    refiner's jobs (one per prompt, as the base's, with the same seeds)."""

    served: ServedModel
    end: float
    jobs: list[Job]

    @property
    def key(self) -> str:
        """What of it decides the images, for the result cache's key."""
        return json.dumps([self.served.fingerprint, self.end, self.jobs[0].conditioning], sort_keys=True)


def _invalid(exc: InvalidRequest) -> InvalidRequestError:
    return InvalidRequestError(f"{exc.json_field}: {exc.detail}", field=exc.json_field)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Generator:
    def __init__(
        self,
        backend: TritonBackend,
        encoder: ImageEncoder,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        cache: ResultCache | None = None,
    ) -> None:
        self.backend = backend
        self.encoder = encoder
        self.settings = settings
        self.metrics = metrics
        self.cache = cache

    async def _streamed(
        self,
        jobs: list[Job],
        request: GenerationOptions,
        progress: ProgressCallback,
        preview: bool,
        init: InitImage | None,
        served: ServedModel,
        refine: Refine | None,
        extra: dict[str, Any],
    ) -> Txt2ImgResult:
        """One prompt through txt2img_stream, `progress` awaited after every step (`extra`: the base
        model's adapters and ControlNets). A base + refiner run
        streams the base's steps then the refiner's as one count: until the hand-off the total is the
        request's steps (exact for first-order schedulers; a second-order one's is settled at the
        hand-off), then the steps both ran."""
        if len(jobs) != 1:
            raise InvalidRequestError("prompts: a streamed generation takes one prompt", field="prompts")
        job = jobs[0]
        if refine is None:
            return await self._stream_one(job, request, preview, init, served.pipeline, progress, extra)
        base_steps = 0  # the base's steps, as it reports them

        async def base_progress(event: Progress) -> None:  # the refiner runs one step at least
            nonlocal base_steps
            base_steps = event.steps
            await progress(
                dataclasses.replace(event, steps=event.steps + max(1, job.params.steps - event.steps))
            )

        async def refiner_progress(event: Progress) -> None:
            await progress(
                dataclasses.replace(event, step=base_steps + event.step, steps=base_steps + event.steps)
            )

        handoff = {"latents": True, "denoising_end": refine.end, **extra}
        base = await self._stream_one(job, request, preview, init, served.pipeline, base_progress, handoff)
        refined = {"denoising_start": refine.end, "start_latents": base.latents}
        second = refine.jobs[0]
        final = await self._stream_one(
            second, request, preview, None, refine.served.pipeline, refiner_progress, refined
        )
        return _handed_off(base, final)

    async def _stream_one(
        self,
        job: Job,
        request: GenerationOptions,
        preview: bool,
        init: InitImage | None,
        pipeline: str,
        progress: ProgressCallback,
        extra: dict[str, Any],
    ) -> Txt2ImgResult:
        stream = self.backend.txt2img_stream(
            job.prompt, preview, pipeline=pipeline, **_call_args(job, request, init, extra)
        )
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, Txt2ImgResult):
                    return event
                await progress(event)
        raise AssertionError("txt2img_stream yields its result last")

    async def _run(
        self, index: int, jobs: list[Job], request: GenerationOptions, init: InitImage | None,
        served: ServedModel, refine: Refine | None, extra: dict[str, Any],
    ) -> Txt2ImgResult:  # fmt: skip
        """Prompt `index`'s txt2img call (`extra`: the model's adapters and ControlNets); a base + refiner
        run's two (the refiner from the base's latents)."""
        job = jobs[index]
        handoff: dict[str, Any] = {} if refine is None else {"latents": True, "denoising_end": refine.end}
        base = await self.backend.txt2img(
            job.prompt,
            pipeline=served.pipeline,
            **_call_args(job, request, init, {**extra, **handoff}),
        )
        if refine is None:
            return base
        second = refine.jobs[index]
        refined = {"denoising_start": refine.end, "start_latents": base.latents}
        final = await self.backend.txt2img(
            second.prompt, pipeline=refine.served.pipeline, **_call_args(second, request, None, refined)
        )
        return _handed_off(base, final)

    async def _refine(
        self, prompts: list[str], request: GenerationOptions, served: ServedModel, jobs: list[Job],
        init: InitImage | None,
    ) -> Refine | None:  # fmt: skip
        """A base + refiner request's refiner and its jobs, checked (the refiner's own limits too); None
        without `refiner`."""
        if request.refiner is None:
            if request.denoising_end is not None:
                raise InvalidRequestError(
                    "denoising_end: applies with a refiner (refiner); none was sent", field="denoising_end"
                )
            return None
        if served.architecture != "sdxl":
            raise InvalidRequestError(
                f"refiner: hands off from an SDXL base model; {served.model} is {served.architecture}",
                field="refiner",
            )
        if init is not None:
            raise InvalidRequestError(
                "refiner: a base + refiner run starts from text; send image-to-image to one model",
                field="refiner",
            )
        refiner = pick(await self.backend.served_models(), request.refiner, self.settings, field="refiner")
        if refiner.architecture != "sdxl-refiner":
            raise InvalidRequestError(
                f"refiner: {refiner.model} is {refiner.architecture}, not an SDXL refiner (sdxl-refiner)",
                field="refiner",
            )
        first = jobs[0].params  # the same size and seeds
        second = request.model_copy(update={"height": first.height, "width": first.width, "seed": first.seed})
        end = DEFAULT_DENOISING_END if request.denoising_end is None else request.denoising_end
        return Refine(refiner, end, self.plan(prompts, second, refiner))

    async def _init_image(self, request: GenerationOptions) -> InitImage | None:
        """The request's init image (and mask), opened and checked off the event loop; None without one."""
        if request.image is None:
            for field, value in (("strength", request.strength), ("mask", request.mask)):
                if value is not None:
                    raise InvalidRequestError(
                        f"{field}: applies to an init image (image); none was sent", field=field
                    )
            return None
        limit = self.settings.max_image_pixels
        image = await self.encoder.run(open_image, request.image, "image", limit)
        if request.mask is None:
            return InitImage(image)
        mask = await self.encoder.run(open_image, request.mask, "mask", limit)
        if mask.size != image.size:
            (mw, mh), (iw, ih) = mask.size, image.size
            raise InvalidRequestError(f"mask: {mw}x{mh}, the image {iw}x{ih}: they must match", field="mask")
        return InitImage(image, mask)

    async def _controls(self, request: GenerationOptions, jobs: list[Job]) -> Controls:
        """The request's ControlNets and their control maps (decoded, checked to be the output's size,
        preprocessed off the event loop); empty without any."""
        if not request.controlnets:
            return Controls()
        params = jobs[0].params
        maps = [
            await self.encoder.run(
                control_map,
                ref.image,
                f"controlnets[{index}].image",
                self.settings.max_image_pixels,
                params.width,
                params.height,
                ref.preprocess,
                ref.low_threshold,
                ref.high_threshold,
            )  # fmt: skip
            for index, ref in enumerate(request.controlnets)
        ]
        return Controls(list(request.controlnets), maps)

    async def served(self, model: str | None = None, loras: list[LoraRef] | None = None) -> ServedModel:
        """The served pipeline a request's `model` names (the default without one); a 422 naming `model`
        and the served ids when it names none. An adapter it does not know yet: read again (one added
        since the last read is found at once)."""
        chosen = pick(await self.backend.served_models(), model, self.settings)
        if loras and any(chosen.adapter(ref.name) is None for ref in loras):
            chosen = pick(await self.backend.served_models(fresh=True), model, self.settings)
        return chosen

    async def check(self, prompts: list[str], request: GenerationOptions) -> None:
        """Every check `generate` makes before Triton (the init image decoded, the request planned),
        for requests answered later (jobs)."""
        init = await self._init_image(request)
        served = await self.served(request.model, request.loras)
        base = _base_request(request)
        jobs = self.plan(prompts, base, served, None if init is None else init.opened.size)
        await self._refine(prompts, request, served, jobs, init)
        await self._controls(request, jobs)

    def plan(
        self,
        prompts: list[str],
        request: GenerationOptions,
        served: ServedModel,
        image_size: tuple[int, int] | None = None,
    ) -> list[Job]:
        """Check every field against the gateway's and the served model's limits; one job per prompt.
        `image_size`: an image-to-image request's init image (width, height), the default size."""
        settings = self.settings
        if len(prompts) > settings.max_batch_prompts:
            raise InvalidRequestError(
                f"prompts: at most {settings.max_batch_prompts} per request, got {len(prompts)}",
                field="prompts",
            )
        prompt_field = "prompt" if len(prompts) == 1 else "prompts"
        texts = [(prompt_field, p) for p in prompts] + [("negative_prompt", request.negative_prompt or "")]
        syntax = request.prompt_syntax or settings.default_prompt_syntax
        for field, text in texts:
            if len(text) > settings.max_prompt_chars:
                raise InvalidRequestError(
                    f"{field}: at most {settings.max_prompt_chars} characters, got {len(text)}", field=field
                )
            try:  # read as the tokenizer will: a prompt it cannot read is refused now (jobs too)
                parse_prompt(text, syntax)
            except PromptSyntaxError as exc:
                raise InvalidRequestError(f"{field}: {exc}", field=field) from None
        height, width = request.height or served.native_height, request.width or served.native_width
        strength = None
        if image_size is not None:  # its size, down to the model's multiple, as diffusers takes it
            multiple = served.spatial_multiple
            height = request.height or image_size[1] - image_size[1] % multiple
            width = request.width or image_size[0] - image_size[0] % multiple
            strength = DEFAULT_STRENGTH if request.strength is None else request.strength
        if height * width > settings.max_pixels:
            raise InvalidRequestError(
                f"width x height: at most {settings.max_pixels} pixels, got {width}x{height}", field="width"
            )
        seed = secrets.randbelow(SEED_RANGE) if request.seed is None else request.seed
        conditioning = size_conditioning(request, served, height, width)
        _check_controlnets(request, served)
        if request.clip_skip and request.clip_skip > served.max_clip_skip:
            raise InvalidRequestError(
                f"clip_skip: {served.model}'s text encoder allows 0 to {served.max_clip_skip}, got "
                f"{request.clip_skip} (GET /v1/models: max_clip_skip)",
                field="clip_skip",
            )
        for ref in request.loras or []:
            if served.adapter(ref.name) is None:
                known = ", ".join(a["name"] for a in served.loras) or "none"
                raise InvalidRequestError(
                    f"loras: no adapter {ref.name!r} in {served.model}'s library (adapters: {known}; "
                    "GET /v1/loras)",
                    field="loras",
                )
        jobs = []
        for index, prompt in enumerate(prompts):
            try:
                checked = validate_params(
                    height=height,
                    width=width,
                    steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    seed=seed + index * request.num_images,
                    scheduler=request.scheduler,
                    num_images=request.num_images,
                    strength=strength,
                    limits=served.limits,
                    spatial_multiple=served.spatial_multiple,
                )
                if strength is not None:
                    start_step(checked.steps, strength)
            except InvalidRequest as exc:
                if image_size is not None and exc.field in ("HEIGHT", "WIDTH"):
                    if getattr(request, exc.json_field) is None:  # the size came from the image
                        size = f"{image_size[0]}x{image_size[1]}"
                        raise InvalidRequestError(
                            f"image: its size {size} is the default, and {exc.json_field} {exc.detail}; "
                            "send width and height to resize it",
                            field="image",
                        ) from None
                raise _invalid(exc) from None
            jobs.append(Job(prompt, checked, conditioning))
        return jobs

    async def generate(
        self,
        prompts: list[str],
        request: GenerationOptions,
        progress: ProgressCallback | None = None,
        preview: bool = False,
        use_cache: bool = True,
    ) -> GenerateResponse:
        """`progress`: one prompt through Triton's txt2img_stream, the callback awaited after every
        denoising step (with previews when `preview`); without it every prompt goes to txt2img.
        `use_cache` False (a `Cache-Control: no-cache` request): no lookup, the fresh result is stored."""
        started = time.perf_counter()
        if request.prompt_syntax is None:  # the gateway's default, sent and in the cache key
            request = request.model_copy(update={"prompt_syntax": self.settings.default_prompt_syntax})
        # 0. An init image opened and checked, the request planned (its size the image's by default), the
        #    image at that size; a seeded request whose result is cached (same served model, same
        #    parameters, same pixels): no inference.
        init = await self._init_image(request)
        served = await self.served(request.model, request.loras)
        jobs = self.plan(prompts, _base_request(request), served, None if init is None else init.opened.size)
        refine = await self._refine(prompts, request, served, jobs, init)
        controls = await self._controls(request, jobs)
        if init is not None:
            init = await self.encoder.run(init.sized, jobs[0].params.width, jobs[0].params.height)
        digest = None if init is None else init.digest
        fingerprint = (
            served.fingerprint if refine is None else f"{served.fingerprint} refined by {refine.key}"
        )
        if request.loras:  # the adapters' files, by hash: one re-added under its name is another key
            fingerprint += " with " + json.dumps(_lora_provenance(served, request))
        if controls.refs:  # the ControlNets, their settings and their control maps' pixels
            fingerprint += " controlled by " + json.dumps(controls.provenance(served))
        learned = served.learned_tokens([*prompts, request.negative_prompt or ""])
        if learned:  # the embeddings the prompts use, by hash: one re-added under its token is another key
            fingerprint += " learned " + json.dumps(learned)
        key = cache_key(fingerprint, prompts, request, jobs, digest) if self.cache else None
        bypass = self.cache is not None and not use_cache and self.cache.bypass(key)
        if self.cache and use_cache and (hit := await self.cache.get(key)) is not None:
            self.metrics.images.inc(len(hit.images))
            total = _ms(time.perf_counter() - started)
            timings = Timings(queue_ms=total, inference_ms=0.0, encode_ms=0.0, total_ms=total)
            return hit.model_copy(update={"timings": timings})

        # 1. One txt2img call per prompt, all in flight together: Triton batches them at the UNet.
        called = time.perf_counter()
        if progress is not None:
            extra = {**_loras(request), **controls.backend_params()}
            results = [await self._streamed(jobs, request, progress, preview, init, served, refine, extra)]
        else:
            extra = {**_loras(request), **controls.backend_params()}
            results = await asyncio.gather(
                *(self._run(i, jobs, request, init, served, refine, extra) for i in range(len(jobs)))
            )
        inferred = time.perf_counter()

        # 2. Encode every image off the event loop.
        arrays = [image for result in results for image in result.images]
        encoded = await self.encoder.encode_all(arrays, request.output_format)
        finished = time.perf_counter()

        # 3. The response: each image with the seed that reproduces it alone.
        images: list[Image] = []
        for index, (job, result) in enumerate(zip(jobs, results, strict=True)):
            for i, image in enumerate(result.images):
                images.append(
                    Image(
                        base64=encoded[len(images)],
                        seed=job.params.seed + i,
                        width=int(image.shape[1]),
                        height=int(image.shape[0]),
                        content_type=CONTENT_TYPES[request.output_format],
                        prompt_index=index,
                    )
                )
        self.metrics.images.inc(len(images))
        for stage, seconds in (
            ("queue", called - started),
            ("inference", inferred - called),
            ("encode", finished - inferred),
        ):
            self.metrics.stage.labels(stage=stage).observe(seconds)
        response = GenerateResponse(
            images=images,
            timings=Timings(
                queue_ms=_ms(called - started),
                inference_ms=_ms(inferred - called),
                encode_ms=_ms(finished - inferred),
                total_ms=_ms(finished - started),
            ),
            provenance=_provenance(
                served, request.scheduler, results, None if init is None else init.mode, refine
            ).model_copy(
                update={
                    "loras": _lora_provenance(served, request),
                    "controlnets": controls.provenance(served),
                }
            ),
            truncation=[
                Truncation(
                    prompt_tokens_cut=r.prompt_truncated_tokens,
                    negative_prompt_tokens_cut=r.negative_prompt_truncated_tokens,
                )
                for r in results
            ],
        )
        if self.cache:
            await self.cache.put(key, response)
        return response.model_copy(update={"cache": "bypass"}) if bypass else response


def _call_args(
    job: Job, request: GenerationOptions, init: InitImage | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """A job's txt2img arguments but the prompt and pipeline: the negative prompt, the init image, its
    conditioning and parameters, and `extra` (adapters, a hand-off's)."""
    return {
        "negative_prompt": request.negative_prompt,
        "prompt_syntax": request.prompt_syntax,
        "clip_skip": request.clip_skip,
        **({} if init is None else init.backend_params()),
        **job.conditioning,
        **extra,
        **dataclasses.asdict(job.params),
    }


@dataclass(frozen=True)
class Controls:
    """A request's ControlNets and their control maps (uint8 [height, width, 3] each)."""

    refs: list[ControlNetRef] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray[Any, Any]] = dataclasses.field(default_factory=list)

    def backend_params(self) -> dict[str, Any]:
        """txt2img's `controlnets` and `control_images` arguments (none without ControlNets)."""
        if not self.refs:
            return {}
        refs = [ref.model_dump(include={"name", "scale", "start", "end"}) for ref in self.refs]
        return {"controlnets": refs, "control_images": np.stack(self.maps)}

    def provenance(self, served: ServedModel) -> list[dict[str, Any]]:
        """Each ControlNet's settings, its sha256 (the model's) and its control map's."""
        sha256 = {entry.get("name"): entry.get("sha256", "") for entry in served.controlnets}
        return [
            {
                **ref.model_dump(exclude={"image"}),
                "sha256": sha256.get(ref.name, ""),
                "map_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            }
            for ref, pixels in zip(self.refs, self.maps, strict=True)
        ]


def _check_controlnets(request: GenerationOptions, served: ServedModel) -> None:
    """The request's ControlNets are the model's, each named once, without LoRA adapters."""
    known = [entry.get("name") for entry in served.controlnets]
    names = [ref.name for ref in request.controlnets or []]
    for name in names:
        if name not in known:
            raise InvalidRequestError(
                f"controlnets: no ControlNet {name!r} in {served.model} (ControlNets: "
                f"{', '.join(str(k) for k in known) or 'none'}; GET /v1/models)",
                field="controlnets",
            )
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"controlnets: a ControlNet is named twice: {names}", field="controlnets")
    if names and request.loras:
        raise InvalidRequestError(
            "controlnets: not with loras in one request (the controlled UNet runs the base's weights)",
            field="controlnets",
        )


def _lora_provenance(served: ServedModel, request: GenerationOptions) -> list[dict[str, Any]]:
    """The request's adapters: name, scale and the sha256 of the file the library holds."""
    return [
        {"name": ref.name, "scale": ref.scale, "sha256": (served.adapter(ref.name) or {}).get("sha256", "")}
        for ref in request.loras or []
    ]


def _loras(request: GenerationOptions) -> dict[str, Any]:
    """The backend's `loras` argument (the model's adapters; a refiner runs without them)."""
    return {"loras": [ref.model_dump() for ref in request.loras]} if request.loras else {}


def _base_request(request: GenerationOptions) -> GenerationOptions:
    """The base model's share of a base + refiner request: the aesthetic scores are the refiner's."""
    if request.refiner is None:
        return request
    return request.model_copy(update=dict.fromkeys(AESTHETIC_FIELDS))


def _handed_off(base: Txt2ImgResult, final: Txt2ImgResult) -> Txt2ImgResult:
    """A base + refiner run's result: the refiner's images, the base's truncation counts (the prompt the
    user wrote), every UNet engine that ran, base first."""
    engines = [*base.engines, *(e for e in final.engines if e not in base.engines)]
    return dataclasses.replace(
        final,
        engines=engines,
        latents=None,
        prompt_truncated_tokens=base.prompt_truncated_tokens,
        negative_prompt_truncated_tokens=base.negative_prompt_truncated_tokens,
    )


def _provenance(
    served: ServedModel,
    scheduler: str,
    results: list[Txt2ImgResult],
    mode: str | None = None,
    refine: Refine | None = None,
) -> Provenance:
    """Each component as Triton's configs say (re-read every few seconds), the UNet as Triton reported
    it with these results (exact: each UNet call is pinned to a version; sd_triton.runtime.triton_io)."""
    components = {
        name: ComponentProvenance(
            engine=info.kind, precision=info.precision, version=info.version, sha256=info.sha256
        )
        for name, info in served.engines.items()
    }
    unet: list[ComponentProvenance] = []
    for result in results:
        for engine in result.engines:
            entry = ComponentProvenance(
                engine=engine["engine"],
                precision=engine["precision"],
                version=engine["version"],
                sha256=engine["sha256"],
            )
            if entry not in unet:
                unet.append(entry)
    if unet:
        components[c.UNET.name] = unet[-1]
    return Provenance(
        model=served.model,
        refiner=None if refine is None else refine.served.model,
        denoising_end=None if refine is None else refine.end,
        mode=mode or "text-to-image",
        scheduler=SchedulerProvenance(name=scheduler, class_name=served.scheduler_class(scheduler)),
        components=components,
        unet_engines=unet,
    )
