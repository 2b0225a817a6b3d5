"""Independent reference for pstrain's models: loss and gradients computed by JAX (float64,
lax.conv_general_dilated + reduce_window + autodiff), on inputs both sides build from the
same closed-form formulas. Writes crates/compute/tests/fixtures/reference_grads.json.

Run once (pip install jax numpy): python3 tools/reference/make_fixture.py
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

LABELS = [3, 7, 1]
SAMPLED = 24  # gradient values kept per tensor (evenly spaced), besides sums


def value(tensor_index, i, fan_in):
    """The formula the Rust test uses too: deterministic, sign-varying, fan-in scaled."""
    return math.sin(0.731 * i + 0.3 * tensor_index + 0.1) / math.sqrt(fan_in)


def pixel(j):
    return 1.5 * math.cos(0.113 * j) + 0.2


def conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def maxpool(x, k):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")


def nll(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(logp[jnp.arange(len(labels)), labels])


def cnn(p, x):
    x = jax.nn.relu(conv(x, p["conv1.weight"], p["conv1.bias"]))
    x = jax.nn.relu(conv(x, p["conv2.weight"], p["conv2.bias"]))
    x = maxpool(x, 2).reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ p["fc1.weight"].T + p["fc1.bias"])
    return x @ p["fc2.weight"].T + p["fc2.bias"]


def convnet(p, x):
    x = jax.nn.relu(maxpool(conv(x, p["conv1.weight"], p["conv1.bias"]), 3))
    return x.reshape(x.shape[0], -1) @ p["fc.weight"].T + p["fc.bias"]


MODELS = {
    "cnn": (cnn, [("conv1.weight", (32, 1, 3, 3), 9), ("conv1.bias", (32,), 9),
                  ("conv2.weight", (64, 32, 3, 3), 288), ("conv2.bias", (64,), 288),
                  ("fc1.weight", (128, 9216), 9216), ("fc1.bias", (128,), 9216),
                  ("fc2.weight", (10, 128), 128), ("fc2.bias", (10,), 128)]),
    "convnet": (convnet, [("conv1.weight", (3, 1, 3, 3), 9), ("conv1.bias", (3,), 9),
                          ("fc.weight", (10, 192), 192), ("fc.bias", (10,), 192)]),
}


def main():
    batch = len(LABELS)
    x = np.array([pixel(j) for j in range(batch * 784)], dtype=np.float32).astype(np.float64)
    x = x.reshape(batch, 1, 28, 28)
    labels = jnp.array(LABELS)
    out = {"labels": LABELS, "sampled_per_tensor": SAMPLED, "models": {}}
    for name, (fn, specs) in MODELS.items():
        params = {}
        for t, (pname, shape, fan_in) in enumerate(specs):
            n = int(np.prod(shape))
            vals = np.array([value(t, i, fan_in) for i in range(n)], dtype=np.float32)
            params[pname] = jnp.array(vals.astype(np.float64).reshape(shape))
        loss, grads = jax.value_and_grad(lambda p: nll(fn(p, x), labels))(params)
        tensors = {}
        for pname, shape, _ in specs:
            g = np.asarray(grads[pname]).reshape(-1)
            idx = sorted({int(k * (len(g) - 1) / (SAMPLED - 1)) for k in range(SAMPLED)})
            tensors[pname] = {
                "sum": float(g.sum()),
                "abs_sum": float(np.abs(g).sum()),
                "indices": idx,
                "values": [float(g[i]) for i in idx],
            }
        out["models"][name] = {"loss": float(loss), "tensors": tensors}
        print(name, "loss", float(loss))
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "crates", "compute", "tests", "fixtures", "reference_grads.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
