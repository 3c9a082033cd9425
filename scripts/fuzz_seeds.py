"""Seeds of the `config` fuzz target from the scenario files and the demo (docs/robustness.md).

Each seed is one byte choosing the filter (0-3: core::filters::FILTERS, 4: the chain) followed by
the configuration's JSON. Run with the project's virtualenv: .venv/bin/python scripts/fuzz_seeds.py
"""
import glob, hashlib, json, os, sys

import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
names = ["request_signature", "replay_guard", "rate_limit", "env_guard"]
out = os.path.join(root, "fuzz", "corpus", "config")
os.makedirs(out, exist_ok=True)


def write(index, text):
    data = bytes([index]) + text.encode()
    with open(os.path.join(out, "seed-" + hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


count = 0
for path in sorted(glob.glob(os.path.join(root, "host-tests", "scenarios", "*.yaml"))):
    try:
        doc = yaml.safe_load(open(path))
    except yaml.YAMLError:
        continue
    found = []

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("configuration"), (dict, str)):
                found.append((x.get("name") or x.get("root_id") or "", x["configuration"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    for name, conf in found:
        text = conf if isinstance(conf, str) else json.dumps(conf)
        index = names.index(name) if name in names else (4 if '"filters"' in text else None)
        if index is not None:
            write(index, text)
            count += 1
write(4, open(os.path.join(root, "fuzz", "src", "demo_chain.json")).read())
print(f"{count + 1} config seeds in {out}", file=sys.stderr)
