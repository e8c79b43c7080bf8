import re
from pathlib import Path

# The dataset registry: users add their datasets here (annotation file, media folder).
DEMO = {
    "annotation_path": str(Path(__file__).resolve().parents[2] / "demo" / "data.json"),
    "data_path": str(Path(__file__).resolve().parents[2] / "demo"),
}

data_dict = {"demo": DEMO}


def parse_sampling_rate(dataset_name):
    match = re.search(r"%(\d+)$", dataset_name)
    return int(match.group(1)) / 100.0 if match else 1.0


def data_list(dataset_names):
    config_list = []
    for dataset_name in dataset_names:
        name = re.sub(r"%(\d+)$", "", dataset_name)
        if name not in data_dict:
            raise ValueError(f"do not find {name}")
        config = data_dict[name].copy()
        config["sampling_rate"] = parse_sampling_rate(dataset_name)
        config_list.append(config)
    return config_list
