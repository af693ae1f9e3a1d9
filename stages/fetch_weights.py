"""fetch_weights: the pinned pretrained VAE (params vae.*) -> models/pretrained/ (weights + origin.json).

Offline with an empty Hugging Face cache it stops in seconds and names the offline switch
(dvc exp run -S vae.pretrained=false); it never falls back to random weights.
"""

import sys
from pathlib import Path

from ctdiff.data.hub import HubError
from ctdiff.models.vae.weights import WeightsError, fetch_pretrained
from ctdiff.params import ParamsError, load_params


def main() -> int:
    try:
        vae = load_params().vae
        record, notes = fetch_pretrained(vae, Path("models/pretrained"))
    except (ParamsError, HubError, WeightsError) as exc:
        print(f"fetch_weights: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"fetch_weights: {note}")
    if record["origin"] == "scratch":
        print(f"fetch_weights: vae.pretrained=false, nothing downloaded; vae_fit trains the {vae.codec} VAE "
              "from scratch")
    else:
        print(f"fetch_weights: {record['repo']}@{record['revision'][:12]} verified -> models/pretrained "
              f"({', '.join(record['files'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
