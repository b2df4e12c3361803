"""The wsa-fl fleet of scripts/compare-flower.sh in Flower's simulation runtime.

The same MLP head (1280→256 ReLU→10, softmax cross-entropy) trained by the same local recipe
as wsa's trainer (wsa/src/train.rs: heavy-ball momentum v ← m·v + g, w ← w − lr·v, weight
decay added to the gradient of weights and biases, fresh velocity each round, reshuffled
each epoch, last partial batch kept; He-normal hidden layer, Xavier-uniform logits, zero
biases), in numpy only, on the same cached features and the same client → rows partition
(wsa-fl's partition-seed0.json). FedAvg weighted by sample count, 10 of 100 clients a round,
no federated evaluation, the global head measured on the full test set after every round.

Message API of Flower 1.42: a `ClientApp` with a `@train()` function, a `ServerApp` running
`flwr.serverapp.strategy.FedAvg.start(..., evaluate_fn=...)`, driven by
`flwr.simulation.run_simulation` on the Ray backend (deprecated in 1.42 in favour of
`flwr run`, which needs a packaged app and a SuperLink; the engine underneath is the same).

  python scripts/flower_sim.py --partition P.json --train T.feat --test T.feat --out F.json
"""
import argparse
import functools
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import numpy as np

HEADER = 136  # wsa's feature cache: magic, version, preprocessing, side, dim, classes, count…


def read_features(path, mmap=True):
    """(labels u32[count], features f32[count, dim]) of a `.feat` cache."""
    head = np.fromfile(path, dtype=np.uint8, count=HEADER)
    assert head[:8].tobytes() == b"WSAFEAT\0", f"{path} is not a wsa feature cache"
    dim = int(head[20:24].view("<u4")[0])
    count = int(head[32:40].view("<u8")[0])
    labels = np.fromfile(path, dtype="<u4", count=count, offset=HEADER)
    offset = HEADER + 4 * count
    if mmap:  # the client actors share the page cache instead of each holding 300 MB
        x = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(count, dim))
    else:
        x = np.fromfile(path, dtype="<f4", count=count * dim, offset=offset).reshape(count, dim)
    return labels, x


@functools.lru_cache(maxsize=1)
def fleet():
    """The training cache and each client's rows; cached once per Ray actor process."""
    labels, x = read_features(os.environ["FLOWER_SIM_TRAIN"])
    clients = json.load(open(os.environ["FLOWER_SIM_PARTITION"]))["clients"]
    return labels, x, [np.asarray(c["indices"], dtype=np.int64) for c in clients]


def init_head(dim, hidden, classes, seed):
    rng = np.random.default_rng(seed)
    a = np.sqrt(6.0 / (hidden + classes))
    return [
        rng.normal(0.0, np.sqrt(2.0 / dim), (dim, hidden)).astype(np.float32),
        np.zeros(hidden, np.float32),
        rng.uniform(-a, a, (hidden, classes)).astype(np.float32),
        np.zeros(classes, np.float32),
    ]


def logits(params, x):
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    return h, h @ w2 + b2


def train(params, x, y, seed, epochs, batch, lr, momentum, wd):
    params = [p.astype(np.float32, copy=True) for p in params]
    velocity = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    loss_sum = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        loss_sum = 0.0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            xb, yb = x[rows], y[rows]
            h, z = logits(params, xb)
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            loss_sum -= np.log(p[np.arange(len(yb)), yb] + 1e-12).sum()
            g = p
            g[np.arange(len(yb)), yb] -= 1.0
            g /= len(yb)  # mean loss over the batch
            dh = (g @ params[2].T) * (h > 0)
            grads = [xb.T @ dh, dh.sum(0), h.T @ g, g.sum(0)]
            for w, v, gr in zip(params, velocity, grads):
                v *= momentum
                v += gr + wd * w
                w -= lr * v
    return params, float(loss_sum) / len(y)


def evaluate(params, x, y):
    _, z = logits(params, x)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float((z.argmax(1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def build_apps(args, record, replied):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def client_train(msg, context):
        labels, x, rows = fleet()
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        idx = rows[pid]
        params, loss = train(msg.content["arrays"].to_numpy_ndarrays(), np.asarray(x[idx]),
                             labels[idx].astype(np.int64), seed=(args.seed, rnd, pid),
                             epochs=args.epochs, batch=args.batch_size, lr=args.lr,
                             momentum=args.momentum, wd=args.weight_decay)
        content = RecordDict({"arrays": ArrayRecord(params),
                              "metrics": MetricRecord({"num-examples": len(idx), "loss": loss})})
        return Message(content=content, reply_to=msg)

    test_y, test_x = read_features(args.test, mmap=False)
    test_y = test_y.astype(np.int64)
    server_app = ServerApp()

    def centralized(server_round, arrays):
        accuracy, loss = evaluate(arrays.to_numpy_ndarrays(), test_x, test_y)
        # The end of round `server_round`: its clients' training, the aggregation, and this
        # evaluation of the 10k test rows (round 0: the initial head).
        record.append({"round": server_round, "t": time.perf_counter(),
                       "test_accuracy": accuracy, "test_loss": loss})
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    class FedAvgCounted(FedAvg):
        # A failed client only logs, and the round goes on without it: count the good ones.
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            replied.append(sum(not m.has_error() for m in replies))
            return super().aggregate_train(server_round, replies)

    @server_app.main()
    def server_main(grid, context):
        strategy = FedAvgCounted(fraction_train=args.per_round / args.clients,
                                 fraction_evaluate=0.0, min_train_nodes=args.per_round,
                                 min_available_nodes=args.clients)
        initial = init_head(test_x.shape[1], args.hidden, 10, args.seed)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                       num_rounds=args.rounds, evaluate_fn=centralized)

    return server_app, client_app


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--partition", "--train", "--test", "--out"):
        ap.add_argument(name, required=True)
    for name, default in [("--rounds", 20), ("--clients", 100), ("--per-round", 10),
                          ("--epochs", 1), ("--batch-size", 64), ("--lr", 0.05),
                          ("--momentum", 0.9), ("--weight-decay", 1e-5), ("--hidden", 256),
                          ("--cpus", os.cpu_count()), ("--seed", 0)]:
        ap.add_argument(name, type=type(default), default=default)
    args = ap.parse_args(argv)
    # The Ray actors inherit the environment: that is how they find the data.
    os.environ["FLOWER_SIM_TRAIN"] = os.path.abspath(args.train)
    os.environ["FLOWER_SIM_PARTITION"] = os.path.abspath(args.partition)

    # The partition's indices must be rows of this cache: check them against its histograms.
    labels, _, rows = fleet()
    clients = json.load(open(args.partition))["clients"]
    assert len(rows) == args.clients, f"{len(rows)} clients in {args.partition}"
    for i, (c, idx) in enumerate(zip(clients, rows)):
        hist = np.bincount(labels[idx], minlength=len(c["histogram"]))
        assert len(idx) == c["size"] and hist.tolist() == c["histogram"], f"client {i}"

    from flwr.simulation import run_simulation

    record, replied = [], []
    started = time.perf_counter()
    server_app, client_app = build_apps(args, record, replied)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"init_args": {"num_cpus": args.cpus},
                                   "client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    total = time.perf_counter() - started
    assert replied == [args.per_round] * args.rounds, f"good replies a round: {replied}"
    assert len(record) == args.rounds + 1, f"{len(record) - 1} of {args.rounds} rounds ran"
    rounds = [{"round": b["round"], "seconds": b["t"] - a["t"],
               "test_accuracy": b["test_accuracy"], "test_loss": b["test_loss"]}
              for a, b in zip(record, record[1:])]
    out = {
        "rounds": rounds,
        "initial_test_accuracy": record[0]["test_accuracy"],
        "total_seconds": total,
        "rounds_seconds": record[-1]["t"] - record[0]["t"],
        "config": {k: v for k, v in vars(args).items()},
        "threads": {k: os.environ.get(k) for k in
                    ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "versions": {"flwr": version("flwr"), "ray": version("ray"),
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"flower: {args.rounds} rounds in {total:.1f} s, final test accuracy "
          f"{rounds[-1]['test_accuracy']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    # Imported under its own name, so that Ray pickles the client's functions by reference
    # and each actor keeps one `fleet()` cache instead of unpickling a fresh one per task.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flower_sim

    flower_sim.main(sys.argv[1:])
