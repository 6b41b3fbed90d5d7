"""Block swap and checkpoint offload: keep big frozen blocks in CPU memory, run them on the GPU.

``BlockOffloader`` serves any stack of transformer blocks executed in a fixed order (FLUX double
then single blocks, SD3 joint blocks). The blocks it is given as *swapped* keep their weights in
(pinned) CPU memory, the master copy; a swapped block's weights exist on the device only while
that block runs forward, or is recomputed and backpropagated.

How (and why this way):

- Each swapped block runs inside a non-reentrant ``torch.utils.checkpoint`` whose ``context_fn``
  brings the weights in for the forward and again for the recomputation in backward. The
  forward therefore saves only the block's inputs; the recomputation re-creates the activations,
  and autograd computes gradients for everything used inside the block that requires them - the
  inputs and trainable tensors that live *outside* the block, e.g. LoRA modules that replaced a
  Linear's ``forward``.
- Bringing weights in does not touch the CPU ``Parameter`` objects: each slot (``module.weight``)
  is pointed at a new device ``Parameter`` and pointed back at the original afterwards. Autograd
  saves frozen weights by object (no detach), so re-pointing ``param.data`` instead would make
  the recomputed graph see the CPU data again when its backward runs. With new objects, the
  device copies stay alive exactly as long as the recomputed graph needs them.
- The base weights of a swapped block must be frozen (``requires_grad=False``): their device
  copies are thrown away, so nothing could receive a gradient. Trainable swapped weights raise.
- On CUDA the next swapped block (in execution order forward, in reverse order during backward)
  is copied on a side stream while the current one computes (non-blocking copies from pinned
  memory). On the CPU the "copies" are the tensors themselves, so tests run the same code.
- Dtypes are kept as they are: fp8 (``float8_e4m3fn``) weights travel as fp8.

``save_on_cpu_async()`` moves tensors that autograd saves (checkpoint inputs) to pinned CPU
memory with non-blocking copies: ``torch.autograd.graph.save_on_cpu`` copies device->host
synchronously, a host sync per block per step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One named tensor of a block: ``owner.<name>`` is a parameter or a buffer."""

    owner: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        # setattr keeps nn.Module's own bookkeeping (parameter vs buffer registration).
        setattr(self.owner, self.name, tensor)


@dataclass
class _Prefetch:
    index: int
    sources: list[int]  # ids of the home tensors copied, to notice if they were replaced meanwhile
    tensors: list[torch.Tensor]  # device copies, one per distinct home tensor of the block
    ready: torch.cuda.Event


def _block_slots(block: nn.Module) -> list[_Slot]:
    slots = []
    for module in block.modules():
        slots += [_Slot(module, name, True) for name, p in module._parameters.items() if p is not None]
        slots += [_Slot(module, name, False) for name, b in module._buffers.items() if b is not None]
    return slots


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.pin_memory()
    except RuntimeError as err:  # no CUDA driver, or the pinned pool is exhausted
        logger.warning("block swap: could not pin %s CPU memory (%s); copies will be synchronous",
                       tuple(tensor.shape), err)
        return tensor


class BlockOffloader:
    """Runs ``blocks[i]`` for i in ``swapped`` with weights brought from the CPU only while needed.

    ``blocks`` is every block in execution order (swapped or not, so indices are positions in that
    order); ``device`` is where the blocks compute. Construction moves the swapped blocks'
    parameters and buffers to CPU memory (pinned when ``device`` is CUDA) - in place, so the
    ``Parameter`` objects (and ``state_dict()``) stay the same. Run a swapped block with
    ``run(i, *args)``; everything else of the model belongs on ``device``, which
    ``move_except_swapped`` arranges without ever materialising the swapped weights there.
    """

    def __init__(self, blocks: Sequence[nn.Module], swapped: Iterable[int], device: torch.device | str) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.order = sorted(set(int(i) for i in swapped))
        bad = [i for i in self.order if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"BlockOffloader: swapped block indices {bad} are outside 0..{len(self.blocks) - 1}")
        self._position = {index: pos for pos, index in enumerate(self.order)}
        self._slots = {i: _block_slots(self.blocks[i]) for i in self.order}
        self._use_streams = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._use_streams else None
        self._pending: _Prefetch | None = None
        self.send_home()

    # -- placement -----------------------------------------------------------------------------

    @property
    def swapped_blocks(self) -> list[nn.Module]:
        return [self.blocks[i] for i in self.order]

    def is_swapped(self, index: int) -> bool:
        return index in self._position

    def send_home(self) -> None:
        """Put every swapped block's tensors in CPU memory (pinned for a CUDA device), in place.

        Cheap when they are there already; call it if something (``model.to(device)``) moved them.
        """
        pin = self._use_streams
        for index in self.order:
            for slot in self._slots[index]:
                tensor = slot.get()
                if tensor.device.type == "cpu" and (not pin or tensor.is_pinned()):
                    continue
                home = tensor.detach().to("cpu")
                if pin:
                    home = _pinned(home)
                if slot.is_param:
                    tensor.data = home  # keep the Parameter object: optimizers and state_dict() see it
                else:
                    slot.set(home)
        self._pending = None

    def move_except_swapped(self, root: nn.Module, device: torch.device | str) -> None:
        """Move every parameter and buffer of ``root`` to ``device``, except the swapped blocks'."""
        device = torch.device(device)
        skip = {id(slot.get()) for index in self.order for slot in self._slots[index]}
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) not in skip and param.device != device:
                    param.data = param.data.to(device)
                    if param.grad is not None:
                        param.grad = param.grad.to(device)
            for name, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in skip and buffer.device != device:
                    setattr(module, name, buffer.to(device))

    # -- running ----------------------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Start copying the first swapped block (call at the top of the model's forward)."""
        if self.order:
            self._prefetch(self.order[0])

    def run(self, index: int, *args: Any, save_inputs_on_cpu: bool = False) -> Any:
        """``blocks[index](*args)`` with the block's weights on the device for its forward/backward.

        With grad enabled the block is checkpointed (only its inputs are saved; with
        ``save_inputs_on_cpu`` those go to CPU memory too). Raises ``RuntimeError`` when a weight
        of the block requires grad.
        """
        block = self.blocks[index]
        if not torch.is_grad_enabled():
            with self._weights_on_device(index, step=1):
                return block(*args)
        self._check_frozen(index)
        saver = save_on_cpu_async() if save_inputs_on_cpu else contextlib.nullcontext()
        with saver:
            return checkpoint(block, *args, use_reentrant=False,
                              context_fn=lambda: (self._weights_on_device(index, step=1),
                                                  self._weights_on_device(index, step=-1)))

    def _check_frozen(self, index: int) -> None:
        trainable = [slot.name for slot in self._slots[index] if slot.is_param and slot.get().requires_grad]
        if trainable:
            raise RuntimeError(
                f"block swap: block {index} has trainable weights ({', '.join(sorted(set(trainable)))}); "
                "swapped blocks keep frozen weights on the CPU and cannot train them. Freeze the base model "
                "(requires_grad_(False)) or lower --blocks_to_swap so that trained blocks stay on the device")

    @contextlib.contextmanager
    def _weights_on_device(self, index: int, step: int) -> Iterator[None]:
        """Within: block ``index`` computes with device copies; ``step`` (+1 forward, -1 backward)
        says which swapped block runs next, to prefetch it."""
        slots = self._slots[index]
        originals = [slot.get() for slot in slots]
        copies = self._take(index, originals)
        for slot, original in zip(slots, originals):
            copy = copies[id(original)]
            slot.set(nn.Parameter(copy, requires_grad=False) if slot.is_param else copy)
        position = self._position[index] + step
        if 0 <= position < len(self.order):
            self._prefetch(self.order[position])
        try:
            yield
        finally:
            for slot, original in zip(slots, originals):
                slot.set(original)

    def _distinct(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for tensor in tensors:
            seen.setdefault(id(tensor), tensor)
        return list(seen.values())

    def _take(self, index: int, originals: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Device copies keyed by ``id(original)``: the prefetched ones, or copies made now."""
        distinct = self._distinct(originals)
        pending, self._pending = self._pending, None
        if pending is not None and pending.index == index and pending.sources == [id(t) for t in distinct]:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(pending.ready)
            for tensor in pending.tensors:
                # Made on the side stream, used on this one: the allocator must wait for this stream.
                tensor.record_stream(stream)
            tensors = pending.tensors
        else:
            tensors = [t.detach().to(self.device, non_blocking=True) for t in distinct]
        return {id(original): tensor for original, tensor in zip(distinct, tensors)}

    def _prefetch(self, index: int) -> None:
        if not self._use_streams:
            return
        distinct = self._distinct([slot.get() for slot in self._slots[index]])
        with torch.cuda.stream(self._stream):
            tensors = [t.detach().to(self.device, non_blocking=True) for t in distinct]
            ready = self._stream.record_event()
        self._pending = _Prefetch(index, [id(t) for t in distinct], tensors, ready)


@contextlib.contextmanager
def save_on_cpu_async() -> Iterator[None]:
    """Tensors autograd saves inside go to (pinned) CPU memory and come back for backward.

    Like ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` but both copies are non-blocking:
    the device->host copy is ordered on the stream before anything that could reuse the source,
    and the host->device copy back is ordered after it, so no host sync is needed.
    """
    def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        if tensor.device.type == "cpu":
            return tensor.device, tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=torch.cuda.is_available())
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, tensor = packed
        return tensor.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
