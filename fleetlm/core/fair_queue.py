"""Scheduling policies: the order in which waiting requests are admitted, and who is preempted.

The ``Scheduler`` keeps its waiting requests in one of these objects. They behave like the
deque it used before (``append``, ``appendleft`` for a preempted request, ``[0]`` to peek,
``popleft``, ``remove``, ``len``, iteration) and add three hooks: ``charge`` (a request was
scheduled ``n`` tokens), ``pick_victim`` (whom to preempt) and ``forget`` (a request ended).

- ``fcfs`` (``FCFSQueue``, the default): one queue ordered by (priority, arrival). Lower
  priority values run first, as in vLLM; with equal priorities it is exactly first come, first
  served, and a preempted request goes back to the head. The victim is the lowest-priority,
  most recently admitted request.
- ``fair`` (``FairQueue``): a virtual token counter per tenant (VTC, Sheng et al., OSDI '24).
  A tenant's counter grows by the service it receives divided by its weight: each prompt token
  computed costs ``prompt_cost`` (1), each generated token ``output_cost`` (2), charged when
  scheduled (a speculative draft position counts as a generated token); prefix-cache hits and
  recomputation after a preemption cost nothing. Admission takes
  the head of the backlogged tenant with the smallest counter (FCFS with priority inside a
  tenant), so under overload backlogged tenants receive service in proportion to their weights.
  It is work-conserving: any backlogged tenant is served when others are idle. A tenant that
  becomes backlogged again has its counter lifted to the smallest backlogged counter (or to the
  counter of the last tenant to leave the queue), so idle time never banks credit. The victim
  of a preemption comes from the tenant furthest over its share (largest counter).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from fleetlm.request import Request


class _PriorityQueue:
    """Requests ordered by (priority, sequence number); ``push_front`` takes a number below
    every other, so with equal priorities this is a deque."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Request]] = []
        self._back = itertools.count()
        self._front = itertools.count(-1, -1)

    def push(self, req: Request, front: bool = False) -> None:
        seq = next(self._front) if front else next(self._back)
        heapq.heappush(self.heap, (req.tenancy.priority, seq, req))

    def peek(self) -> Request:
        return self.heap[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self.heap)[2]

    def remove(self, req: Request) -> None:
        for i, entry in enumerate(self.heap):
            if entry[2] is req:
                self.heap[i] = self.heap[-1]
                self.heap.pop()
                heapq.heapify(self.heap)
                return
        raise ValueError("request is not waiting")

    def __len__(self) -> int:
        return len(self.heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in self.heap)


class WaitingQueue:
    """The interface the ``Scheduler`` calls; subclasses are the policies."""

    def __init__(self) -> None:
        self.preemptions: dict[str, int] = {}  # per tenant id, cumulative

    def append(self, req: Request) -> None: raise NotImplementedError
    def appendleft(self, req: Request) -> None: raise NotImplementedError
    def popleft(self) -> Request: raise NotImplementedError
    def peek(self) -> Request: raise NotImplementedError
    def remove(self, req: Request) -> None: raise NotImplementedError
    def __len__(self) -> int: raise NotImplementedError
    def __iter__(self) -> Iterator[Request]: raise NotImplementedError

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, i: int) -> Request:
        if i != 0:
            raise IndexError("only the head of the waiting queue can be read")
        if not self:
            raise IndexError("the waiting queue is empty")
        return self.peek()

    def charge(self, req: Request, num_tokens: int) -> None:
        """``req`` is scheduled ``num_tokens`` tokens after its ``num_computed_tokens``."""

    def forget(self, req: Request) -> None:
        """``req`` has ended (finished, aborted or failed): drop any state kept for it."""

    def pick_victim(self, candidates: list[Request]) -> Request | None:
        """Whom to preempt among ``candidates`` (running, in admission order); default: the
        lowest priority (largest value), then the most recently admitted."""
        if not candidates:
            return None
        return max(enumerate(candidates), key=lambda ic: (ic[1].tenancy.priority, ic[0]))[1]

    def note_preempted(self, req: Request) -> None:
        tid = req.tenancy.tenant_id
        self.preemptions[tid] = self.preemptions.get(tid, 0) + 1


class FCFSQueue(WaitingQueue):
    def __init__(self) -> None:
        super().__init__()
        self._q = _PriorityQueue()

    def append(self, req: Request) -> None:
        self._q.push(req)

    def appendleft(self, req: Request) -> None:
        self.note_preempted(req)
        self._q.push(req, front=True)

    def popleft(self) -> Request:
        return self._q.pop()

    def peek(self) -> Request:
        return self._q.peek()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class FairQueue(WaitingQueue):
    def __init__(self, prompt_cost: float = 1.0, output_cost: float = 2.0) -> None:
        super().__init__()
        if prompt_cost < 0 or output_cost < 0 or prompt_cost + output_cost <= 0:
            raise ValueError("token costs must be >= 0 and not both 0")
        self.prompt_cost, self.output_cost = prompt_cost, output_cost
        self.queues: dict[str, _PriorityQueue] = {}
        self.counters: dict[str, float] = {}  # virtual service: cost-weighted tokens / weight
        self.service: dict[str, float] = {}  # cost-weighted tokens served, unnormalised
        self.weights: dict[str, float] = {}
        self._charged: dict[str, int] = {}  # request id -> positions already charged (high-water mark)
        self._last_left = 0.0
        self._len = 0

    def append(self, req: Request) -> None:
        self._push(req, front=False)

    def appendleft(self, req: Request) -> None:
        self.note_preempted(req)
        self._push(req, front=True)

    def _push(self, req: Request, front: bool) -> None:
        tid = req.tenancy.tenant_id
        self.weights[tid] = req.tenancy.weight
        q = self.queues.setdefault(tid, _PriorityQueue())
        if not q:  # (re)joins the backlog: no credit for the time it was idle
            backlogged = [self.counters[t] for t, other in self.queues.items() if other and t != tid]
            floor = min(backlogged) if backlogged else self._last_left
            self.counters[tid] = max(self.counters.get(tid, 0.0), floor)
        q.push(req, front)
        self._len += 1

    def _head_tenant(self) -> str:
        best = None
        for tid, q in self.queues.items():
            if q:
                key = (self.counters[tid], q.heap[0][0], q.heap[0][1])
                if best is None or key < best[0]:
                    best = (key, tid)
        if best is None:
            raise IndexError("the waiting queue is empty")
        return best[1]

    def peek(self) -> Request:
        return self.queues[self._head_tenant()].peek()

    def popleft(self) -> Request:
        tid = self._head_tenant()
        req = self.queues[tid].pop()
        self._len -= 1
        if not self.queues[tid]:
            self._last_left = self.counters[tid]
        return req

    def remove(self, req: Request) -> None:
        q = self.queues.get(req.tenancy.tenant_id)
        if q is None:
            raise ValueError("request is not waiting")
        q.remove(req)
        self._len -= 1

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain.from_iterable(self.queues.values())

    def charge(self, req: Request, num_tokens: int) -> None:
        start = req.num_computed_tokens
        end = start + num_tokens
        done = self._charged.get(req.request_id, start)  # prefix hits were never computed: free
        lo, p = max(start, done), req.num_prompt_tokens
        new_prompt = max(0, min(end, p) - lo)
        samples = max(0, end - max(lo, p - 1))  # positions from the last prompt token on each sample one (drafts too)
        self._charged[req.request_id] = max(done, end)
        cost = new_prompt * self.prompt_cost + samples * self.output_cost
        if cost:
            tid = req.tenancy.tenant_id
            self.service[tid] = self.service.get(tid, 0.0) + cost
            self.counters[tid] = self.counters.get(tid, 0.0) + cost / self.weights.get(tid, req.tenancy.weight)

    def forget(self, req: Request) -> None:
        self._charged.pop(req.request_id, None)

    def pick_victim(self, candidates: list[Request]) -> Request | None:
        if not candidates:
            return None
        worst = max(self.counters.get(r.tenancy.tenant_id, 0.0) for r in candidates)
        return super().pick_victim([r for r in candidates if self.counters.get(r.tenancy.tenant_id, 0.0) == worst])


POLICIES = {"fcfs": FCFSQueue, "fair": FairQueue}


def make_waiting_queue(policy: str) -> WaitingQueue:
    """The waiting queue of scheduling policy ``policy`` (``fcfs`` | ``fair``)."""
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {policy!r}") from None
