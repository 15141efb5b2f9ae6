from setuptools import find_packages, setup

# The apps stay top-level folders in the checkout but install under vlatent/_apps/ (see vlatent/shipped.py), so no
# generic name (train, eval, demo) lands in site-packages; their recipes, DeepSpeed configs and scripts ship with them.
APPS = ("data_builders", "train", "eval", "demo")

setup(
    name="vlatent",
    version="0.1.0",
    description="Latent visual reasoning for vision-language models: Mirage, Monet, Latent Sketchpad, "
    "CoCoVa and perception tokens on one core over HuggingFace transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vlatent", "vlatent.*"]) + [f"vlatent._apps.{app}" for app in APPS],
    package_dir={f"vlatent._apps.{app}": app for app in APPS},
    package_data={
        "vlatent": ["README.md", "assets/tiny_base/*"],  # the pretrained tiny base (`vlatent pretrain-base`)
        "vlatent._apps.data_builders": ["README.md"],
        "vlatent._apps.eval": ["README.md"],
        "vlatent._apps.demo": ["README.md"],
        "vlatent._apps.train": ["README.md", "recipes/*.yaml", "recipes/*/*.yaml", "recipes/*/README.md",
                                "ds_configs/*.json", "scripts/*.sh"],
    },
    install_requires=[
        # torch is installed first (see README); the range only checks it, never pulls another build.
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "transformers>=5.23,<5.26",  # tested on 5.23 and 5.25 (5.24 renamed past_key_values to cache)
        "tokenizers>=0.21,<1",
        "timm>=1.0,<2",
        "open_clip_torch>=2.26,<4",  # CoCoVa's contrastive loss, the sketch decoder's aligner
        "diffusers>=0.32,<1",  # CoCoVa's UNet, the sketch and depth decoders
        "pillow>=10,<13",
        "accelerate>=1.4,<2",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "pyyaml>=6,<7",
        "matplotlib>=3.8,<4",
        "peft>=0.14,<1",
    ],
    extras_require={
        "train": ["deepspeed>=0.16,<0.20"],
        "demo": ["gradio>=6.0,<7"],
        "all": ["deepspeed>=0.16,<0.20", "gradio>=6.0,<7"],
        "tensorboard": ["tensorboard>=2.14,<3"],
        "wandb": ["wandb>=0.16,<1"],
        "lmms": ["lmms-eval>=0.7.3,<0.8"],
        # lmms-eval: the adapter's tests run in CI too (it leaves torch and transformers as they are)
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "playwright>=1.40,<2", "lmms-eval>=0.7.3,<0.8"],
    },
    entry_points={"console_scripts": ["vlatent=vlatent.cli:main"]},
)
