from setuptools import find_packages, setup

setup(
    name="vlatent",
    version="0.1.0",
    description="Latent visual reasoning for vision-language models: Mirage, Monet, Latent Sketchpad, "
    "CoCoVa and perception tokens on one core over HuggingFace transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vlatent", "vlatent.*"]),
    package_data={"vlatent": ["assets/tiny_base/*"]},  # the pretrained tiny base (`vlatent pretrain-base`)
    install_requires=[
        # torch is installed first (see README); the range only checks it, never pulls another build.
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "transformers>=5.0,<5.24",  # 5.24 renames ModelOutput's past_key_values to cache
        "tokenizers>=0.21,<1",
        "timm>=1.0,<2",
        "open_clip_torch>=2.26,<4",
        "diffusers>=0.32,<1",
        "pillow>=10,<13",
        "deepspeed>=0.16,<0.20",
        "gradio>=6.0,<7",
        "accelerate>=1.4,<2",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "pyyaml>=6,<7",
        "matplotlib>=3.8,<4",
        "peft>=0.14,<1",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "playwright>=1.40,<2"],
    },
    entry_points={"console_scripts": ["vlatent=vlatent.cli:main"]},
)
