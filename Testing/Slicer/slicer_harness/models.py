"""Model folders for tests that run the library's real command line.

* :func:`writeRandomModels` - a GAN and a segmenter with random weights in the library's real
  checkpoint format (``save_checkpoint`` + ``write_model_card``), tiny configurations, a 32 x 32 x 8
  grid: a few seconds to make, enough to exercise the CLI end to end (geometry, outputs, errors).
* :func:`trainTinyModels` - a real, if tiny, pipeline: phantom cohort -> GAN training ->
  pseudo-masks -> TransUNet training (about 1.5 minutes on 2 CPU cores); used by slow tests.

Both run in a child process so that the test process itself never imports torch (the torch-free
GUI process is one of the things tested).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_RANDOM = r'''
import sys, torch
from pathlib import Path
from CovidGANSegLib.checkpoints import save_checkpoint, write_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.gan import GAN_ARCH
from CovidGANSegLib.gan.networks import GAN_CONFIGS, DenseUNetGenerator3D
from CovidGANSegLib.seg.transunet import SEG_CONFIGS, TransUNet

folder = Path(sys.argv[1])
pp = PreprocessConfig(grid=(32, 32, 8), min_slices=1)
torch.manual_seed(0)
gan_cfg = GAN_CONFIGS["tiny"]
gan = folder / "gan" / "model.pt"
gan.parent.mkdir(parents=True, exist_ok=True)
save_checkpoint(gan, kind="gan", arch=GAN_ARCH, config=gan_cfg.to_dict(), metadata={"demo": True}, preprocess=pp.to_dict(),
                generator=DenseUNetGenerator3D(gan_cfg).state_dict(), iteration=0)
write_model_card(gan, name="random-gan", kind="gan", arch=GAN_ARCH, config_name="tiny", config=gan_cfg.to_dict(),
                 trained_on="nothing (random weights, synthetic phantoms test)", demo=True)
seg_cfg = SEG_CONFIGS["tiny"]
seg = folder / "seg" / "model.pt"
seg.parent.mkdir(parents=True, exist_ok=True)
save_checkpoint(seg, kind="seg", arch="transunet", config=seg_cfg.to_dict(), metadata={"demo": True}, preprocess=pp.to_dict(),
                model=TransUNet(seg_cfg).state_dict(), threshold=0.5)
write_model_card(seg, name="random-transunet", kind="seg", arch="transunet", config_name="tiny", config=seg_cfg.to_dict(),
                 trained_on="nothing (random weights, synthetic phantoms test)", demo=True)
print(gan); print(seg)
'''

_TRAIN = r'''
import sys
from pathlib import Path
from CovidGANSegLib import progress
progress.set_mode("none")
from CovidGANSegLib.synth.phantoms import write_cohort
from CovidGANSegLib.gan.training import train_gan
from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks
from CovidGANSegLib.seg.training import train_segmenter
out = Path(sys.argv[1])
cohort = write_cohort(out / "cohort", healthy=3, covid=3, seed=0, size="small")
gan = train_gan(cohort, out / "models" / "gan", config="tiny", iterations=int(sys.argv[2]), device="cpu")
pm = make_pseudo_masks(gan, cohort, out / "pseudo_masks", device="cpu")
seg = train_segmenter(pm, out / "models" / "seg", config="tiny", iterations=int(sys.argv[3]), device="cpu")
print(gan); print(seg)
'''


def _run(code: str, *args: str, timeout: float) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"making test models failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-2:]


def writeRandomModels(folder: Path) -> dict[str, str]:
    """``{"folder", "gan", "seg"}`` - random-weight tiny models in the real checkpoint format."""
    gan, seg = _run(_RANDOM, folder, timeout=300)
    return {"folder": str(folder), "gan": gan, "seg": seg}


def trainTinyModels(folder: Path, ganIterations: int = 20, segIterations: int = 20) -> dict[str, str]:
    """``{"folder", "gan", "seg", "cohort"}`` - tiny models trained on a 6-study phantom cohort."""
    gan, seg = _run(_TRAIN, folder, ganIterations, segIterations, timeout=1200)
    return {"folder": str(Path(folder) / "models"), "gan": gan, "seg": seg, "cohort": str(Path(folder) / "cohort")}
