"""CrypTen's communicator over timm-mpc's own links (:mod:`..links`: TLS with pinned peers, or plaintext on loopback)
in place of torch.distributed's gloo, which has neither encryption nor authentication in the PyTorch wheels.

The collectives are CrypTen's, point to point over the links, and counted by CrypTen's own ``_logging`` decorator, so
rounds and bytes are what CrypTen's ``DistributedCommunicator`` counts. timm-mpc's own messages (the agreement, the
dealer's requests and answers, the generators' seeds, the admission) go through :meth:`send_tensor`,
:meth:`recv_tensor`, :meth:`send_frame` and :meth:`recv_frame`, uncounted, as they were beside gloo's counters.
Ranks are global: 0 the owner, 1 the client, 2 the dealer; a group is the tuple of its ranks. Imported once CrypTen
is (:func:`.compat.import_crypten`).
"""
import pickle
import struct
from typing import Any, List, Optional, Sequence

import torch
from torch.distributed import ReduceOp

from ..errors import PeerError
from ..links import FRAME_LIMIT, ROLES, Links

from crypten.common import serial
from crypten.communicator.communicator import Communicator, _logging
from crypten.communicator.distributed_communicator import DistributedCommunicator

__all__ = ['LinkCommunicator']

_SIZE = struct.Struct('<q')


def _buffer(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared with it (a 0-d tensor as one element)."""
    return memoryview(tensor.reshape(-1).numpy()).cast('B')


class _Done:
    """A completed operation's handle (CrypTen waits on what ``isend`` returns)."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _PendingRecv:
    """``irecv``'s handle: the tensor is filled when it is waited on (the links keep what arrives meanwhile)."""

    def __init__(self, comm: 'LinkCommunicator', tensor: torch.Tensor, src: int) -> None:
        self.comm, self.tensor, self.src, self.done = comm, tensor, src, False

    def wait(self) -> None:
        if not self.done:
            self.comm.recv_tensor(self.src, self.tensor)
            self.done = True

    def is_completed(self) -> bool:
        return self.done


def _combine(tensors: Sequence[torch.Tensor], op: Any) -> torch.Tensor:
    result = tensors[0].clone()
    for t in tensors[1:]:
        if op == ReduceOp.SUM:
            result += t
        elif op == ReduceOp.BXOR:
            result ^= t
        else:
            raise ValueError(f'the links reduce with SUM or BXOR (what CrypTen uses); got {op}')
    return result


class LinkCommunicator(Communicator):
    """CrypTen's ``Communicator`` over :class:`~timm_mpc.secure.links.Links` (the module docstring)."""

    BYTES_PER_ELEMENT = 8
    instance: Optional['LinkCommunicator'] = None

    def __init__(self, links: Links, world_size: int, init_ttp: bool) -> None:
        self.links, self.rank, self.world_size = links, links.rank, world_size
        self.main_group = tuple(range(world_size))
        self.ttp_group = tuple(range(world_size + int(init_ttp)))
        self.ttp_comm_group = (0, world_size) if init_ttp else None
        self.ttp_initialized = init_ttp
        self._name = f'rank{self.rank}'
        self.reset_communication_stats()

    @classmethod
    def start(cls, links: Links, world_size: int, init_ttp: bool) -> 'LinkCommunicator':
        """Make this process's communicator (CrypTen's ``comm.get()``) the one over ``links``."""
        cls.instance = cls(links, world_size, init_ttp)
        return cls.instance

    @classmethod
    def is_initialized(cls) -> bool:
        return cls.instance is not None

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_ttp: bool = False) -> None:
        """``crypten.init()`` outside timm-mpc's parties (a CrypTen program of one's own in this process): CrypTen's
        own communicator over torch.distributed, configured as CrypTen configures it."""
        DistributedCommunicator.initialize(rank, world_size, init_ttp)
        cls.instance = DistributedCommunicator.instance

    @classmethod
    def get(cls) -> Optional['LinkCommunicator']:
        return cls.instance

    @classmethod
    def shutdown(cls) -> None:
        comm, cls.instance = cls.instance, None
        if not isinstance(comm, LinkCommunicator):  # None, or CrypTen's own (:meth:`initialize`)
            if comm is not None:
                DistributedCommunicator.shutdown()
            return
        try:
            if comm.rank == 0 and comm.ttp_initialized:  # CrypTen's own end of the dealer's loop
                comm.send_frame(comm.get_ttp_rank(), pickle.dumps('terminate'))
        except PeerError:  # the dealer is gone already
            pass
        comm.links.close()

    # timm-mpc's own messages, uncounted (and what an instrumented party records: tests/party_spy.py)
    def send_tensor(self, dst: int, tensor: torch.Tensor) -> None:
        self.links.send(dst, _buffer(tensor.detach().contiguous()))

    def recv_tensor(self, src: int, tensor: torch.Tensor) -> torch.Tensor:
        """Fill ``tensor`` (in place) with the next tensor ``src`` sent; returns it."""
        if tensor.is_contiguous():
            self.links.recv_into(src, _buffer(tensor))
        else:
            tensor.copy_(self.recv_tensor(src, torch.empty_like(tensor, memory_format=torch.contiguous_format)))
        return tensor

    def send_frame(self, dst: int, data: bytes) -> None:
        """``data`` after its size, as one message."""
        self.links.send(dst, _SIZE.pack(len(data)) + bytes(data))

    def recv_frame(self, src: int, limit: int = FRAME_LIMIT, error: type = PeerError) -> bytes:
        """The next framed message from ``src``; a size outside 1 to ``limit`` is refused before any allocation."""
        size, = _SIZE.unpack(self.links.recv(src, _SIZE.size))
        if not 0 < size <= limit:
            raise error(f'the {ROLES[src]} announced a message of {size} bytes; accepted: 1 to {limit}')
        return self.links.recv(src, size)

    def _other(self, src: Optional[int]) -> int:
        if src is None:
            if self.world_size != 2:
                raise ValueError('recv without a source needs two parties')
            return 1 - self.rank
        return src

    # CrypTen's communicator, counted by its own decorator
    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.send_tensor(dst, tensor.data)

    @_logging
    def recv(self, tensor: torch.Tensor, src: Optional[int] = None) -> torch.Tensor:
        return self.recv_tensor(self._other(src), tensor.clone().contiguous())

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Done:
        self.send_tensor(dst, tensor.data)
        return _Done()

    @_logging
    def irecv(self, tensor: torch.Tensor, src: Optional[int] = None) -> _PendingRecv:
        return _PendingRecv(self, tensor.data, self._other(src))

    @_logging
    def scatter(self, scatter_list: List[torch.Tensor], src: int, size: Any = None, device: Any = None) -> torch.Tensor:
        if src == self.rank:
            for rank in self.main_group:
                if rank != src:
                    self.send_tensor(rank, scatter_list[rank].data)
            return scatter_list[self.rank].data
        if size is None:
            size = scatter_list[self.rank].size()
        return self.recv_tensor(src, torch.empty(size=size, dtype=torch.long))

    def _reduce_to(self, tensors: List[torch.Tensor], dst: int, op: Any) -> Optional[List[torch.Tensor]]:
        if self.rank != dst:
            for t in tensors:
                self.send_tensor(dst, t)
            return None
        parts = {self.rank: tensors}
        for rank in self.main_group:
            if rank != dst:
                parts[rank] = [self.recv_tensor(rank, torch.empty_like(t)) for t in tensors]
        return [_combine([parts[r][i] for r in self.main_group], op) for i in range(len(tensors))]

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = [x.data.contiguous() for x in input] if batched else [input.data.contiguous()]
        result = self._reduce_to(tensors, dst, op)
        if result is None:
            return None
        return result if batched else result[0]

    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = [x.data.contiguous() for x in input] if batched else [input.data.contiguous()]
        for rank in self.main_group:  # every party's parts go out before any is awaited (the links never block on it)
            if rank != self.rank:
                for t in tensors:
                    self.send_tensor(rank, t)
        parts = {self.rank: tensors}
        for rank in self.main_group:
            if rank != self.rank:
                parts[rank] = [self.recv_tensor(rank, torch.empty_like(t)) for t in tensors]
        result = [_combine([parts[r][i] for r in self.main_group], op) for i in range(len(tensors))]
        return result if batched else result[0]

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> List[Optional[torch.Tensor]]:
        if self.rank != dst:
            self.send_tensor(dst, tensor.data)
            return [None]
        return [tensor.data.clone() if rank == dst else self.recv_tensor(rank, torch.empty_like(tensor.data))
                for rank in self.main_group]

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        for rank in self.main_group:
            if rank != self.rank:
                self.send_tensor(rank, tensor.data)
        return [tensor.data.clone() if rank == self.rank else self.recv_tensor(rank, torch.empty_like(tensor.data))
                for rank in self.main_group]

    @_logging
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        ranks = self.main_group if group is None else group
        tensors = list(input) if batched else [input]
        for t in tensors:
            if self.rank == src:
                for rank in ranks:
                    if rank != src:
                        self.send_tensor(rank, t.data)
            else:
                self.recv_tensor(src, t.data)
        return input

    @_logging
    def barrier(self) -> None:
        token = torch.zeros(1, dtype=torch.uint8)
        for rank in self.main_group:
            if rank != self.rank:
                self.send_tensor(rank, token)
        for rank in self.main_group:
            if rank != self.rank:
                self.recv_tensor(rank, token)

    @_logging
    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        self.send_frame(dst, pickle.dumps(obj))

    @_logging
    def recv_obj(self, src: int, group: Any = None) -> Any:
        return serial.restricted_loads(self.recv_frame(src))

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        ranks = self.main_group if group is None else group
        if self.rank == src:
            data = pickle.dumps(obj)
            for rank in ranks:
                if rank != src:
                    self.send_frame(rank, data)
            return obj
        return serial.restricted_loads(self.recv_frame(src))

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f'a party\'s name is a str, got {type(name).__name__}')
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return 'timm-mpc links'
