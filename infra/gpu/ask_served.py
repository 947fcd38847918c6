"""Ask a running `mlflow models serve` of the moa pyfunc as a client would (used by `run_flow.sh serve`).

    python infra/gpu/ask_served.py PORT OUT.json

Waits for /ping (up to $MOA_SERVE_WAIT, default 240 s: the server loads the base model and the experts first), then sends one routed
request with a prompt per domain of the default params.yaml and one request with a forced expert, over plain HTTP
(no client library beyond the standard one). Writes the answers and the request times to OUT.json; exits non-zero
when the server does not come up or a request is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

PROMPTS = [
    "Complete the following Python function.\n\n\ndef add(a: int, b: int) -> int:\n",
    "What is Fever?",
    "Write the opening paragraph of a business news article titled: Shares fall as bank cuts forecast",
    "Write the opening paragraph of a sport news article titled: Late goal sends United through",
]


def wait_up(base: str, timeout: float) -> float:
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=5)
            return time.time() - t0
        except OSError:
            if time.time() - t0 > timeout:
                sys.exit(f"the scoring server did not answer {base}/ping within {timeout:.0f} s: see serve.log")
            time.sleep(2)


def post(base: str, body: dict) -> tuple[dict, float]:
    req = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read()), time.time() - t


def main(port: int, out: str) -> None:
    base = f"http://127.0.0.1:{port}"
    up = wait_up(base, float(os.environ.get("MOA_SERVE_WAIT", "240")))
    params = {"max_new_tokens": 40}
    routed, t_routed = post(base, {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]},
                                   "params": params})
    forced, t_forced = post(base, {"dataframe_split": {"columns": ["prompt", "domain"],
                                                       "data": [[PROMPTS[1], "medicine"]]}, "params": params})
    result = {"server_up_s": round(up, 1),
              "routed": [{"prompt": p, **a} for p, a in zip(PROMPTS, routed["predictions"])],
              "routed_request_s": round(t_routed, 2),
              "forced": forced["predictions"], "forced_request_s": round(t_forced, 2)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
