"""Stable Diffusion 2.x: U-Net 865.9M (head dim 64, linear projections), OpenCLIP-H text.

Fine-tune the U-Net from a diffusers folder on your own captioned images (the default variant):

  python -m ldm_jax.data build folder --src my_images/ --data_dir data
  python train.py --config configs/sd21.py:finetune --workdir runs/sd21_ft \
      --config.init=/models/stable-diffusion-2-1 --config.data.name=image_folder/my_images

From scratch (every network random; bring a tokenizer folder and a trained VAE run):

  python train.py --config configs/sd21.py:scratch --workdir runs/sd21_scratch \
      --config.tokenizer=tokenizers/clip --config.vae_workdir=runs/vae --config.data.name=...

MLPerf Training's Stable Diffusion benchmark (`:mlperf`, configs/common.py `mlperf`): the SD 2
U-Net from scratch at 512 px with the v objective over the frozen VAE and OpenCLIP-H of
stable-diffusion-2-base, AdamW at 1.25e-7 x 512 with 10k warm-up steps, evaluated every 1000
steps on 30k COCO-2014 captions (50 DDIM steps, guidance 8) until FID <= 90 and CLIP >= 0.15
(the mean cosine with OpenCLIP ViT-H/14). Bring LAION-400M-filtered as img2dataset tar shards,
the COCO captions (one per line) and statistics, the Inception and CLIP weights:

  python -m ldm_jax.data precompute --config configs/sd21.py:mlperf \
      --config.init=/models/stable-diffusion-2-base \
      --config.data.name='webdataset:/data/laion400m/{00000..00831}.tar' \
      --out /data/encoded --name laion400m_512 --dtype float16
  python -m ldm_jax.evaluation ref-stats --images /data/coco2014/val2014_512x512_30k \
      --inception /models/pt_inception-2015-12-05-6726825d.pth \
      --out /data/coco2014/val2014_30k_stats.npz
  python train.py --config configs/sd21.py:mlperf --workdir runs/mlperf_sd \
      --config.init=/models/stable-diffusion-2-base \
      --config.data.name=precomputed/laion400m_512 --config.data.data_dir=/data/encoded \
      --config.data.precomputed=True \
      --config.eval.prompts_file=/data/coco2014/val2014_30k_captions.txt \
      --config.eval.fid_stats=/data/coco2014/val2014_30k_stats.npz \
      --config.eval.inception=/models/pt_inception-2015-12-05-6726825d.pth \
      --config.eval.clip=/models/CLIP-ViT-H-14-laion2B-s32B-b79K

(MLPerf's own val2014_30k_stats.npz, made with pytorch-fid, can be given as it is.) Each
evaluation logs eval/fid, eval/clip_score (100 x cosine) and eval/clip_cosine, and the target:
"target fid<=90: 85.2 met, clip_cosine>=0.15: 0.161 met".

Add ',runlocal' (`configs/sd21.py:finetune,runlocal`) for a CPU smoke run with the tiny preset
on the shapes dataset (build it first: python -m ldm_jax.data build shapes --data_dir data
--image_size 32 --num_train 64 --num_holdout 16).
"""

from configs import common


def get_config(arg='finetune'):
  return common.stable_diffusion('sd21', 768, 'v_prediction', arg)
