"""The training memory options of the DiT denoisers (FLUX.1, SD3): gradient checkpointing, with or
without offloading the saved block inputs to the CPU, and block swap.

:class:`DiTMemoryMixin` holds the logic; a model says only which block stacks it has, in execution
order (FLUX: ``double_blocks`` then ``single_blocks``; SD3: ``joint_blocks``), and how many blocks of
each stack ``--blocks_to_swap N`` keeps in CPU memory (always the last ones of the stack). The rule
for the largest N is shared too: every stack keeps ``MIN_RESIDENT_BLOCKS`` blocks on the device, as
the reference requires. The mechanics of swapping are :mod:`library.families.offload`'s.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.families.offload import BlockOffloader, save_on_cpu_async

MIN_RESIDENT_BLOCKS = 2  # of each block stack, when swapping blocks (as the reference requires)

#: ``--blocks_to_swap N`` -> how many blocks of each stack (in stack order) are swapped
SwapPlan = Callable[[int], Sequence[int]]


def largest_block_swap(plan: SwapPlan, stack_sizes: Sequence[int]) -> int:
    """The largest N whose ``plan(N)`` leaves ``MIN_RESIDENT_BLOCKS`` of every stack on the device (0 if none).

    ``plan`` must not decrease in any stack as N grows (both models' plans do not), so the allowed
    values are exactly ``0..result``.
    """
    n = 0
    while all(count <= size - MIN_RESIDENT_BLOCKS for count, size in zip(plan(n + 1), stack_sizes)):
        n += 1
    return n


class DiTMemoryMixin:
    """Memory options of a DiT made of stacks of transformer blocks; mixed into an ``nn.Module``.

    The subclass contract:

    * call :meth:`_init_memory_options` in ``__init__`` (after ``nn.Module.__init__``);
    * :meth:`_block_stacks`: ``(name, ModuleList)`` pairs in execution order; a block's index for
      :meth:`_run_block` is its position in the concatenation of the stacks;
    * :meth:`_swap_plan`: how many blocks of each stack (from its end) ``--blocks_to_swap N`` swaps;
    * :meth:`_reference_weight`: a parameter that is never swapped, whose dtype and device are the model's;
    * ``swap_label``: the model's name in error messages (``"FLUX"``, ``"SD3"``);
    * ``forward`` calls :meth:`_begin_forward` once, then runs every block through :meth:`_run_block`.
    """

    swap_label: str = "DiT"

    def _init_memory_options(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.blocks_to_swap = 0
        self._offloader: BlockOffloader | None = None

    # -- the subclass's part -----------------------------------------------------------------------

    def _block_stacks(self) -> list[tuple[str, nn.ModuleList]]:
        raise NotImplementedError

    def _swap_plan(self, num_blocks: int) -> Sequence[int]:
        raise NotImplementedError

    def _reference_weight(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self._reference_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._reference_weight().device

    def block_swap_limit(self) -> int:
        """The largest ``--blocks_to_swap`` this model allows (see :func:`largest_block_swap`)."""
        return largest_block_swap(self._swap_plan, [len(blocks) for _, blocks in self._block_stacks()])

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Checkpoint every block in training mode; ``cpu_offload`` keeps the saved block inputs in
        CPU memory (``--cpu_offload_checkpointing``)."""
        self.gradient_checkpointing = True
        self.cpu_offload_checkpointing = cpu_offload

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False

    def enable_block_swap(self, num_blocks: int, device: torch.device | str) -> None:
        """Keep the last blocks of each stack that ``_swap_plan(num_blocks)`` names in CPU memory and
        run them on ``device`` (``--blocks_to_swap``). Their weights must be frozen. Follow with
        ``move_to_device_except_swap_blocks(device)``; 0 turns swapping off. Raises ``ValueError``
        above :meth:`block_swap_limit`."""
        stacks = self._block_stacks()
        limit = self.block_swap_limit()
        if not 0 <= num_blocks <= limit:
            sizes = ", ".join(f"{len(blocks)} {name}" for name, blocks in stacks)
            each = " of each kind" if len(stacks) > 1 else ""
            raise ValueError(f"--blocks_to_swap {num_blocks}: this {self.swap_label} model ({sizes} blocks) allows at "
                             f"most {limit}, keeping {MIN_RESIDENT_BLOCKS} blocks{each} on the device")
        self.blocks_to_swap = num_blocks
        if num_blocks == 0:
            self._offloader = None
            return
        blocks: list[nn.Module] = []
        swapped: list[int] = []
        for (_, stack), count in zip(stacks, self._swap_plan(num_blocks)):
            end = len(blocks) + len(stack)
            swapped += range(end - count, end)
            blocks += stack
        self._offloader = BlockOffloader(blocks, swapped, device)

    def move_to_device_except_swap_blocks(self, device: torch.device | str) -> None:
        """``self.to(device)`` without moving the swapped blocks (they stay in CPU memory)."""
        if self._offloader is None:
            self.to(device)
        else:
            self._offloader.move_except_swapped(self, device)

    def prepare_block_swap_before_forward(self) -> None:
        """Send swapped blocks back to CPU memory if something moved them (no-op without swapping)."""
        if self._offloader is not None:
            self._offloader.send_home()

    def _begin_forward(self) -> None:
        if self._offloader is not None:
            self._offloader.begin_forward()

    def _run_block(self, index: int, block: nn.Module, *args: torch.Tensor | None):
        """``block(*args)``, swapped in when it is a swapped block, checkpointed when enabled (training
        with gradients only)."""
        offload_inputs = self.gradient_checkpointing and self.cpu_offload_checkpointing
        if self._offloader is not None and self._offloader.is_swapped(index):
            return self._offloader.run(index, *args, save_inputs_on_cpu=offload_inputs)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            with save_on_cpu_async() if offload_inputs else contextlib.nullcontext():
                return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
