"""The small interface every federated algorithm implements; the round loop is generic.

An algorithm answers three questions, and the loop (:mod:`cafedist.train.round`) does the rest:

* **local objective** -- what a client minimises: :meth:`Algorithm.local_loss` on a
  :class:`LocalBatch` (private batch, optional proxy batch), organised in
  :meth:`Algorithm.local_phases` (which model, which parameters, how many epochs);
* **exchange** -- what leaves a client after local training:
  proxy-set logits of the exits it reads (``exchanges_logits``), other per-client rows
  (:meth:`Algorithm.upload`), and parameters averaged over clients
  (:meth:`Algorithm.shared_mask`: sample-weighted, deterministic, optionally only over the
  clients that hold a parameter or element);
* **aggregate** -- what the coordinator computes from the gathered rows
  (:meth:`Algorithm.aggregate`, rank 0 only, batched tensor math over clients) and how a
  client takes its own row of the result (:meth:`Algorithm.receive`).

Per-client algorithm state (teacher targets, student masks, reference parameters...) is a
``dict[str, Tensor]`` in the client, checkpointed with it and moved with it when clients are
re-placed on another number of ranks. A client may hold several same-architecture models
(``extra_models``, e.g. Ditto's global model next to the personal one); ``"main"`` is the one
that is evaluated.

The rules the loop relies on -- the order of the hooks in a round and the rank each runs on,
which hooks may change a client's state, keyed randomness, phase names, what a vmappable loss
may do, the exchange rows' shapes -- are in ``docs/ALGORITHMS.md`` ("What the loop relies
on"); :func:`cafedist.algorithms.check_algorithm` checks a class at registration, and
``tests/test_algorithm_contract.py`` runs every registered algorithm parked and resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (row shape, dtype)
#: one check of an algorithm's parameters: (field, ok, what the field must be, e.g. "> 0").
#: A ``Params`` dataclass lists its checks in a ``checks()`` method; the config reports the
#: first failed one as ``algorithm.<name>.<field>: must be <expected>, got <value>``.
Check = tuple[str, bool, str]


@dataclass(frozen=True)
class Setup:
    """Facts of the run an algorithm may depend on (identical on every rank)."""

    num_clients: int
    num_exits: int
    num_classes: int
    rounds: int
    train_sizes: tuple[int, ...]  # per client id
    seed: int
    local_epochs: int = 1
    proxy_size: int = 0  # P' (0 when the algorithm exchanges no logits)
    # per client id: the count of each label in its train split (what FedRoD's balanced
    # softmax needs); empty unless the algorithm sets ``uses_label_counts``
    label_counts: tuple[tuple[int, ...], ...] = ()

    @property
    def data_weights(self) -> Tensor:
        """Sample-size weights w (sum to 1), float64, indexed by client id."""
        w = torch.tensor(self.train_sizes, dtype=torch.float64)
        return w / w.sum()


@dataclass
class LocalBatch:
    """One local step's inputs to the loss."""

    logits: list[Tensor]  # per exit, [B, C] on the private batch
    y: Tensor  # [B] labels
    x: Tensor | None = None  # the private inputs (for algorithms needing features)
    module: nn.Module | None = None  # the model being trained (for proximal terms)
    phase: str = "train"  # name of the current local phase
    proxy_logits: list[Tensor] | None = None  # per exit, [Bp, C] on the proxy batch
    proxy_pos: Tensor | None = None  # [Bp] rows of this client's current targets
    proxy_x: Tensor | None = None  # the proxy inputs


@dataclass(frozen=True)
class Phase:
    """A stretch of local training: which model, which parameters, how long."""

    name: str = "train"
    model: str = "main"  # which of the client's models is trained
    epochs: int | None = None  # None: train.local_epochs
    trainable: Callable[[str], bool] | None = None  # parameter-name filter; None: all
    upto: int | None = None  # run only exits 0..upto-1 (depth-limited clients)


@dataclass
class ClientView:
    """What an algorithm hook may see of a client (never its data)."""

    cid: int
    models: dict[str, nn.Module]
    state: dict[str, Tensor] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.models["main"]


@dataclass
class NoParams:
    """The parameters of an algorithm that has none (``Params``' default)."""


class Algorithm:
    """Base class; subclasses set ``name`` and ``Params`` and override what they need.

    The defaults describe purely local training: every exit trained with CE, nothing exchanged.
    Everything the loop (:mod:`cafedist.train`) and packed training read from an algorithm is
    declared here: the class attributes below and the methods of this class. Methods that
    exchange proxy logits start from :class:`~cafedist.algorithms.logit_exchange.LogitExchange`,
    which implements the proxy-side hooks for them.

    Class attributes:

    * ``name``, ``Params`` -- the registry name and the parameter dataclass (``algorithm.NAME.*``).
    * ``exchanges_logits`` -- the loop computes every client's proxy logits each round and
      gathers them to rank 0 (``gathered["logits"]`` in :meth:`aggregate`).
    * ``vmappable_loss`` -- :meth:`local_loss` reads only the batch's tensors and the state,
      never ``batch.module`` (under packing a stand-in whose attributes, calls and iteration
      raise), calls no ``.item()`` and branches on no tensor value, so packed training may call
      it under ``torch.func.vmap``.
    * ``common_init`` -- all clients start from the same weights (FedAvg family).
    * ``extra_models`` -- more same-architecture models per client (e.g. Ditto's global model).
    * ``shared_model`` -- whose parameters :meth:`shared_mask` refers to.
    * ``non_holders_receive`` -- clients that do not hold a shared parameter still receive the
      holders' average (DepthFL, ScaleFL: every client keeps a copy of the one global model).
    * ``cohort_exchange`` -- the coordinator needs only this round's active clients: the loop
      computes and gathers only their rows and calls :meth:`aggregate_cohort`, so the exchange's
      time and memory follow the cohort, not ``n`` (partial participation at scale).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    exchanges_logits: ClassVar[bool] = False
    vmappable_loss: ClassVar[bool] = False
    common_init: ClassVar[bool] = False
    extra_models: ClassVar[tuple[str, ...]] = ()
    shared_model: ClassVar[str] = "main"
    non_holders_receive: ClassVar[bool] = False
    # Setup.label_counts is filled only for algorithms that read it: it costs a read of every
    # client's labels at start-up, on every rank
    uses_label_counts: ClassVar[bool] = False
    cohort_exchange: ClassVar[bool] = False

    @classmethod
    def needs_proxy(cls, params: Any) -> bool:
        """Whether a run of this algorithm with ``params`` loads the proxy set (and then
        exchanges proxy logits): ``exchanges_logits`` unless a parameter switches it on."""
        return cls.exchanges_logits

    @classmethod
    def rounds_dependence(cls, params: Any, rounds: int, done: int, new_rounds: int) -> list[str]:
        """What the first ``done`` rounds of a run of ``rounds`` rounds in all did that depends on
        that total (:attr:`Setup.rounds`) and would have gone otherwise in a run of ``new_rounds``,
        one phrase each, e.g. ``"fedbabu fine-tuned the heads after round 19, the last of 20:
        ..."``; [] when nothing did (default).

        ``--resume force`` onto another ``train.rounds`` warns with these phrases: such an extended
        run differs from one trained for the new total from the start. An algorithm whose phases
        or schedule read ``self.setup.rounds`` answers it (``tests/test_train_resume.py`` checks)."""
        return []

    @classmethod
    def proxy_size(cls, params: Any, available: int) -> int:
        """P': how many proxy items a round exchanges logits on, out of the ``available`` ones
        (0 when :meth:`needs_proxy` is false). Default: all of them."""
        return available if cls.needs_proxy(params) else 0

    def __init__(self, params: Any, setup: Setup):
        self.params = params
        self.setup = setup

    def bind_model(self, model: nn.Module) -> None:
        """Called once on every rank, before anything else, with an untrained instance of the
        run's architecture: learn parameter names and shapes here (e.g. for ``upload_spec``)."""

    # ---------------------------------------------------------------- client side
    def init_client_state(self, cid: int) -> dict[str, Tensor]:
        """Initial per-client algorithm state: tensors only (checkpointed, parked and moved with
        the client). Keep these keys for the whole run: a resume refuses a shard without one."""
        return {}

    def local_phases(self, client: ClientView, round_idx: int) -> list[Phase]:
        """The local training of ``round_idx`` (default: one phase, all parameters)."""
        return [Phase()]

    def post_phases(self, client: ClientView, round_idx: int, trained: bool) -> list[Phase]:
        """Training after this round's aggregation (e.g. FedBABU's final head fine-tuning).

        Asked of every client; ``trained`` says whether it trained this round (an idle client
        has received the current shared parameters but no payload). ``round_idx`` counts from 0
        (the last round is ``self.setup.rounds - 1``). These phases draw no proxy batches, are
        not preceded by :meth:`on_local_start`, and their loss is not in the round's ``loss``;
        name them apart from the round's local phases (a name keys the random streams). Change
        the client's state only when returning phases: otherwise the client is not marked
        changed, and the change is lost when it is parked and missing from the next checkpoint.
        """
        return []

    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        """Called once per round for each client that trains, right before :meth:`local_phases`
        (e.g. snapshot the global weights for a proximal term). Keep what it computes in
        ``client.state``, not on ``self``: packed training calls it for a whole wave of clients
        before any of them steps."""

    def uses_proxy_batch(self, client: ClientView, phase: Phase) -> bool:
        """Whether this phase's local steps also need a proxy mini-batch (rows of the client's
        current targets, see :meth:`targets_round`)."""
        return False

    def targets_round(self, state: dict[str, Tensor]) -> int | None:
        """The round whose proxy subset the client's current targets were computed on, None
        when it holds none. The loop draws proxy batches from that subset, so an algorithm
        with proxy batches must answer it (:class:`~cafedist.algorithms.logit_exchange.LogitExchange`
        does)."""
        return None

    def trained_exits(self, state: dict[str, Tensor]) -> Tensor:
        """Bool [m]: the exits a client trains with CE this round (default: all). The round
        record's ``n_students`` counts the shallow ones over active clients; packed training
        steps clients together only when their masks agree (the loss's control flow may
        depend on it)."""
        return torch.ones(self.setup.num_exits, dtype=torch.bool)

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        """The loss a client minimises on one local step (default: CE summed over exits).
        ``state`` is read-only here (under packing it is a stacked copy)."""
        return sum(torch.nn.functional.cross_entropy(z, batch.y) for z in batch.logits)

    def exit_losses(self, state: dict[str, Tensor], batch: LocalBatch) -> list[Tensor | None]:
        """The local loss split by exit: entry k holds every term on exit k's logits (its CE,
        its KD...), None when exit k gets no loss this step; the entries sum to
        :meth:`local_loss`. Read by diagnostics (``train.diagnostics: [conflict]``), never by
        training. Default: CE on every exit, matching the default :meth:`local_loss`;
        algorithms whose loss differs per exit override both."""
        return [torch.nn.functional.cross_entropy(z, batch.y) for z in batch.logits]

    def eval_model(self, client: ClientView) -> nn.Module:
        """The network that answers for this client (evaluation and proxy logits).

        Default: the ``"main"`` model. Override for composite predictors (e.g. generic +
        personal heads); the returned module must map inputs to a list of per-exit logits, and
        ``cafedist export`` also needs its ``exit_stages()`` (see
        :meth:`~cafedist.models.base.EarlyExitNet.exit_stages`; FedRoD's is an example).
        """
        return client.model

    # ---------------------------------------------------------------- exchange
    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool | Tensor:
        """Does client ``cid`` contribute to (and receive) the average of parameter ``key``?

        ``False``: personal. ``True``: averaged (sample-weighted) over all active clients that
        share it; every holder receives the average, active or not (an idle client downloads
        the current global parameters like any other). A bool tensor shaped like the parameter:
        element-wise holding mask (width-scaled sub-models); each element is averaged over its
        holders only. Must depend only on (cid, key, shape): every rank evaluates it for every
        client to know the holders.
        """
        return False

    def sent_exits(self, every_exit: bool = False) -> list[int]:
        """The exits whose proxy logits the loop gathers, in increasing order (read only when
        ``exchanges_logits``): every exit here; ``every_exit`` is ``comm.exits: all``."""
        return list(range(self.setup.num_exits))

    def upload_spec(self) -> Spec:
        """Per-client rows (besides proxy logits) sent to the coordinator each round: name ->
        (row shape, dtype); :meth:`upload` must match it exactly (checked)."""
        return {}

    def upload(self, client: ClientView) -> dict[str, Tensor]:
        """This client's rows, shaped as :meth:`upload_spec` says. Asked of every client, idle
        ones too (only those that trained under ``cohort_exchange``), on clients the loop does
        not mark changed: it must not change the client's state."""
        return {}

    # ---------------------------------------------------------------- coordinator (rank 0)
    def aggregate(self, round_idx: int, gathered: dict[str, Tensor],
                  active: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """From the gathered rows (client-id order; ``"logits"`` [n, e, P', C] for algorithms
        that exchange logits: the exits of :meth:`sent_exits`)
        compute per-client payload rows. ``active`` (bool [n]) marks
        the clients that trained this round; only they receive their rows.

        Returns ``(payload, report)``: ``payload`` maps a name to a tensor whose first
        dimension is the client id (every :meth:`payload_spec` key, ``[n, *row]`` in its dtype:
        checked); ``report`` holds small JSON-able facts for metrics. Runs on rank 0 only: what
        it keeps on ``self`` exists there alone, and survives a resume only through
        :meth:`server_state`.
        """
        return {}, {}

    def aggregate_cohort(self, round_idx: int, gathered: dict[str, Tensor],
                         cohort: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """:meth:`aggregate` over the active clients only (``cohort_exchange``): rows [k, ...]
        of the clients ``cohort`` (int64 [k], increasing ids); payload rows [k, ...] for them.
        An algorithm that sets ``cohort_exchange`` implements it."""
        raise NotImplementedError(f"{self.name}: cohort_exchange is set but aggregate_cohort is missing")

    def payload_spec(self) -> Spec:
        """Shape (without the client dimension) and dtype of each payload entry."""
        return {}

    def receive(self, client: ClientView, payload: dict[str, Tensor], round_idx: int) -> None:
        """Take this client's row of the aggregate (called on the client's own rank)."""

    def server_state(self) -> dict[str, Any]:
        """Coordinator state that must survive a resume (tensors and plain data only). Saved from
        rank 0; on a resume every rank's :meth:`load_server_state` gets it."""
        return {}

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`server_state` returned."""

    def uses_exchange(self) -> bool:
        """Whether the coordinator step runs at all this run."""
        return self.exchanges_logits or bool(self.upload_spec()) or bool(self.payload_spec())
