"""Launched by tests/test_distributed.py under `accelerate launch`: train the demo on every rank and record
which adapter each rank holds, so the test can check that all ranks agree with the one saved."""

import hashlib
import json
import os
import sys
from pathlib import Path

from peft import get_peft_model_state_dict

from smolora_mlflow import SmoLoRA, SmoloraConfig


def adapter_digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    cfg = SmoloraConfig(max_steps=6, max_length=32, per_device_train_batch_size=4, max_samples=64,
                        output_dir=str(out), experiment_name="ddp", lora_dropout=0.0)
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    rank = os.environ.get("RANK", "0")
    record = {"rank": rank, "world_size": os.environ.get("WORLD_SIZE"), "run_id": result.run_id,
              "step": result.global_step, "digest": adapter_digest(get_peft_model_state_dict(lora.model))}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
