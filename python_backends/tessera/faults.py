"""Fault injection for tests and soak runs (engine setting `fault_injection: on`; never on by default).

A request whose prompt carries a marker fails at that stage, on the real server, through the real code:
  [[fault:start]]    its prompt encoding raises            (that request alone fails)
  [[fault:sampler]]  its sampler update raises             (that request alone fails)
  [[fault:decode]]   its VAE decode raises                 (that request alone fails)
  [[fault:preview]]  its progress preview raises           (that request alone fails)
  [[fault:step]]     the denoiser run of its step raises   (every request of that step fails)
  [[fault:loop]]     the engine loop itself dies           (the model reports not ready)
The wrappers sit in front of the real pipeline and denoiser; the engine does not know they exist.
"""

from __future__ import annotations

from typing import Any

from .interfaces import CallStats, Denoiser, Inputs, Pipeline, Run

MARK = "[[fault:{}]]"
_STEP_KEY = "__fault_step__"  # rides on one request's denoiser inputs to the denoiser wrapper


class InjectedFault(RuntimeError):
    """A fault injected on purpose (contained by the engine like any other failure)."""


class LoopFault(BaseException):
    """An injected failure the engine cannot contain (a BaseException, as an interpreter-level failure
    would be): it ends the engine loop."""


def _marked(run: Run, stage: str) -> bool:
    return MARK.format(stage) in run.params.prompt  # type: ignore[attr-defined]


class FaultyPipeline:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def start(self, params: Any) -> Run:
        if MARK.format("loop") in params.prompt:
            raise LoopFault("injected: engine loop failure")
        if MARK.format("start") in params.prompt:
            raise InjectedFault("injected: prompt encoding failure")
        return self.pipeline.start(params)

    def denoiser_inputs(self, run: Run) -> Inputs:
        inputs = self.pipeline.denoiser_inputs(run)
        return {**inputs, _STEP_KEY: inputs["sample"]} if _marked(run, "step") else inputs

    def apply(self, run: Run, noise_pred: Any) -> None:
        if _marked(run, "sampler"):
            raise InjectedFault("injected: sampler failure")
        self.pipeline.apply(run, noise_pred)

    def truncate(self, run: Run, total: int, clean: bool = True) -> None:
        self.pipeline.truncate(run, total, clean)

    def finish(self, run: Run):
        if _marked(run, "decode"):
            raise InjectedFault("injected: decode failure")
        return self.pipeline.finish(run)

    def preview(self, run: Run):
        if _marked(run, "preview"):
            raise InjectedFault("injected: preview failure")
        return self.pipeline.preview(run)

    def __getattr__(self, name: str) -> Any:  # count_tokens, spec, ... of the real pipeline
        return getattr(self.pipeline, name)


class FaultyDenoiser:
    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def run(self, items: list[Inputs], adapters: list[Any] | None = None,
            controls: list[Any] | None = None, places: list | None = None) -> tuple[list[Any], CallStats]:
        if any(_STEP_KEY in it for it in items):
            raise InjectedFault(f"injected: denoiser failure on a step of {len(items)} requests")
        return self.denoiser.run(items, adapters, controls, places)


def inject(pipeline: Pipeline, denoiser: Denoiser) -> tuple[Pipeline, Denoiser]:
    return FaultyPipeline(pipeline), FaultyDenoiser(denoiser)
