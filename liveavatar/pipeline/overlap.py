"""Overlap the streaming VAE decode of block b with the DiT of block b+1 on one CUDA device.

A producer thread drives the DiT block loop (an iterator of (block, final latents x)) on the
device's current stream and hands each block over through a one-slot queue together with CUDA
events around its work. The caller's thread (the consumer) makes a dedicated decode stream wait
on the block's end event, decodes there, and yields the uint8 frames once they are on the CPU.
The GPU then runs the next block's DiT kernels while the decode of the previous block runs.

Thread hygiene: grad / inference mode and the current device are thread-local in PyTorch, so the
producer re-enters the caller's; the producer's exceptions (GenerationCancelled included) are
re-raised in the consumer; closing the consumer early sets a stop flag that the producer polls
between denoising steps (through `stopped`), and the consumer joins the thread before returning.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator

import torch

from liveavatar.pipeline.plan import BlockSpec

_DONE = object()
THREAD_NAME = "liveavatar-dit"


class _Stopped(Exception):
    """Internal: the consumer went away; the producer ends quietly."""


def _thread_modes(device: torch.device) -> Callable[[], contextlib.ExitStack]:
    """A factory of the caller's thread-local modes (inference/no-grad, current device)."""
    inference = torch.is_inference_mode_enabled()

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
        stack.enter_context(torch.cuda.device(device))
        return stack

    return enter


def overlapped_decode(produce: Callable[[Callable[[], bool]], Iterator[tuple[BlockSpec, torch.Tensor]]],
                      make_decoder: Callable[[], Callable[[BlockSpec, torch.Tensor], torch.Tensor]],
                      device: torch.device) -> Iterator[tuple[BlockSpec, torch.Tensor, dict]]:
    """Yield (block, frames uint8 [n, H, W, 3] on the CPU, timings) with decode and DiT overlapped.

    produce(stopped): the DiT block loop, run in the producer thread; yields (block, x) with x the
    block's final latents [16, n, h, w] on `device`; it must call `stopped()` between steps and
    stop (any exception) when it returns True. make_decoder(): builds the decode function
    (block, x) -> frames; it is called on the decode stream so that all of its state lives there.
    timings: {"dit": GPU seconds of the block's DiT span, "decode": GPU seconds of its decode}.
    """
    if device.type != "cuda":
        raise ValueError(f"overlap_decode needs a CUDA device, got {device}; pass overlap_decode=False")
    items: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    modes = _thread_modes(device)
    dit_stream = torch.cuda.current_stream(device)

    def put(item) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def producer() -> None:
        try:
            with modes(), torch.cuda.stream(dit_stream):
                it = produce(stop.is_set)
                while True:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(dit_stream)
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(dit_stream)
                    put((nxt[0], nxt[1], start, end))
                    del nxt
            put(_DONE)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            if not stop.is_set():
                with contextlib.suppress(_Stopped):
                    put(exc)

    decode_stream = torch.cuda.Stream(device=device)
    decode_stream.wait_stream(dit_stream)  # inputs made before the loop (reference, motion latents)
    thread = threading.Thread(target=producer, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        with torch.cuda.device(device), torch.cuda.stream(decode_stream):
            decode = make_decoder()  # the warm-up decode runs alongside the first block's DiT
        while True:
            item = items.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            block, x, start, end = item
            d0, d1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.device(device), torch.cuda.stream(decode_stream):
                decode_stream.wait_event(end)
                x.record_stream(decode_stream)  # not reused by the DiT's allocator until decoded
                d0.record(decode_stream)
                frames = decode(block, x)  # ends with a copy to the CPU (synchronises this stream)
                d1.record(decode_stream)
            del x
            d1.synchronize()
            timings = {"dit": start.elapsed_time(end) / 1000.0, "decode": d0.elapsed_time(d1) / 1000.0}
            yield block, frames, timings
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a producer waiting on the full slot
                items.get_nowait()
        thread.join()
