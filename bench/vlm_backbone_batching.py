"""Policies conditioned by a whole VLM (spec §8.4): one VLM call for a batch of robots with different
instructions, against the per-length groups it replaced, side by side in one process.

    python bench/vlm_backbone_batching.py [--robots 8] [--repeats 20] [--rounds 5]

For each backbone (`vlm_foundry_backbone`: our tiny `vlm`; `vlm_backbone`: a tiny Idefics3, both built on the
spot with random weights, as the tests build them), the backbone's conditioning of --robots robots with as many
different instructions, computed
- in one call, each robot's action token right after its own tokens (`place_action_token`, what serves), and
- as groups of equally long prompts with the padding removed (`by_prompt_length`, the path of models whose prompt
  attends both ways, and this server's first version);
the median over --rounds of the mean of --repeats calls, the two interleaved; and the largest difference between
them (they must agree). One torch thread, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.factories import build_tiny_tokenizer, vlm_foundry_policy, vlm_hf_policy  # noqa: E402
from vla_foundry.checkpoint import load_model  # noqa: E402
from vla_foundry.models.vlm_backbones import by_prompt_length  # noqa: E402
from vla_foundry.pipelines.action import ActionPipeline  # noqa: E402
from vla_foundry.robotics.observations import RawObservation  # noqa: E402

INSTRUCTIONS = ["pick", "pick up the red block", "place the red block in the bin", "open the drawer",
                "push the blue cube to the left", "stack the cups", "close the door now", "wipe the table"]


def measure(name: str, build, args) -> str:
    """One table row: ``build``'s policy, --robots robots with different instructions, both ways."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        build(path, build_tiny_tokenizer())
        pipeline = ActionPipeline.from_experiment(load_model(path), path)
        r, rng = pipeline.robot_io, np.random.default_rng(0)
        samples = [RawObservation({n: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for n in r.image_names},
                                  {f: np.zeros((r.past_steps + 1, r.field_dims[f]), np.float32)
                                   for f in r.proprioception_fields},
                                  INSTRUCTIONS[i % len(INSTRUCTIONS)] + " now" * (i // len(INSTRUCTIONS)))
                   for i in range(args.robots)]
        inputs = pipeline.prepare(samples)
        backbone = pipeline.model.vision_language_backbone
        extra = {"pixel_values": inputs.pixel_values, **inputs.backbone_inputs}
        ways = {
            "one call": lambda: backbone(inputs.input_ids, inputs.pixel_values, inputs.attention_mask,
                                         inputs.attention_mask_images, **inputs.backbone_inputs),
            "groups": lambda: by_prompt_length(backbone._encode_alike, inputs.input_ids, inputs.attention_mask,
                                               extra),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        with torch.inference_mode():
            for way in ways.values():
                way()
            for _ in range(args.rounds):
                for label, way in ways.items():
                    started = time.perf_counter()
                    for _ in range(args.repeats):
                        way()
                    times[label].append((time.perf_counter() - started) / args.repeats * 1000)
            difference = float((ways["one call"]() - ways["groups"]()).abs().max())
        one, groups = statistics.median(times["one call"]), statistics.median(times["groups"])
        lengths = len(set(inputs.attention_mask.sum(dim=1).tolist()))
        return (f"| {name} | {args.robots} | {lengths} | {one:.2f} ms | {groups:.2f} ms | {groups / one:.2f}× | "
                f"{difference:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| backbone | robots | prompt lengths | one call | per-length groups | groups ÷ one | max difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, build in (("vlm_foundry_backbone", vlm_foundry_policy), ("vlm_backbone", vlm_hf_policy)):
        print(measure(name, build, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
