"""Share an exported model: push its folder (model.pte, manifest, tokenizer) to the Hugging Face Hub.

Usage: python examples/push.py MODEL REPO_ID [--local-dir DIR]
--local-dir writes the folder that would be uploaded (save_pretrained) instead of pushing: a dry run.
Anyone can then run it without exporting: ETModelForCausalLM.from_pretrained(REPO_ID).
"""

import argparse

from et_transformers.threads import prefer_single_threaded_blas

prefer_single_threaded_blas()

from et_transformers import ETModelForCausalLM  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="Hub id, model folder, .gguf file or exported folder")
parser.add_argument("repo_id", help="target repository, e.g. me/SmolLM2-135M-executorch")
parser.add_argument("--local-dir", help="save here instead of pushing (dry run)")
args = parser.parse_args()

model = ETModelForCausalLM.from_pretrained(args.model)
if args.local_dir:
    model.save_pretrained(args.local_dir)
    print(f"saved {args.local_dir}: what `push_to_hub({args.repo_id!r})` would upload")
else:
    url = model.push_to_hub(args.repo_id)
    print(f"pushed to {url}")
