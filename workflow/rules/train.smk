# Training both models from a training manifest (SPINEPS supplement A).
# Targets: train_semantic, train_instance, train_models. Models land in <results>/training/models/.
TRAIN = config["training"]
TRAIN_ROOT = RESULTS / "training"
TRAIN_MANIFEST = (
    RESULTS / "training" / "demo_cohort" / "cohort.tsv"
    if TRAIN["manifest"] == "demo"
    else Path(TRAIN["manifest"])
)
SEM = TRAIN["semantic"]
INST = TRAIN["instance"]
NNUNET_DATASET = f"Dataset{SEM['dataset_id']:03d}_{SEM['name']}"
TRAIN_FOLDS = range(SEM["folds"])
FOLD_RESULTS = (
    TRAIN_ROOT
    / "nnUNet_results"
    / NNUNET_DATASET
    / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
)
TRAINED_SEMANTIC = TRAIN_ROOT / "models" / "semantic"
TRAINED_INSTANCE = TRAIN_ROOT / "models" / "instance"
LAB = TRAIN["labeling"]
LABELING_TRAIN_MANIFEST = (
    RESULTS / "training" / "demo_labeling_cohort" / "cohort.tsv"
    if TRAIN["manifest"] == "demo"
    else Path(TRAIN["manifest"])
)
TRAINED_LABELING = TRAIN_ROOT / "models" / "labeling"


rule train_models:
    input:
        TRAINED_SEMANTIC / "inference_config.json",
        TRAINED_INSTANCE / "inference_config.json",


rule train_semantic:
    input:
        TRAINED_SEMANTIC / "inference_config.json",


rule train_instance:
    input:
        TRAINED_INSTANCE / "inference_config.json",


rule train_labeling:
    input:
        TRAINED_LABELING / "inference_config.json",


rule demo_training_cohort:
    output:
        manifest=RESULTS / "training" / "demo_cohort" / "cohort.tsv",
    log:
        LOGS / "demo_training_cohort.log",
    params:
        subjects=TRAIN["demo"]["subjects"],
        seed=TRAIN["demo"]["seed"],
        first=TRAIN["demo"]["first_index"],
        preset=config["demo"]["preset"],
        folder=lambda wildcards, output: Path(output.manifest).parent,
    shell:
        "spinecohort phantom {params.folder} --subjects {params.subjects} --seed {params.seed}"
        " --first-index {params.first} --preset {params.preset} &> {log}"


rule semantic_training_data:
    input:
        manifest=TRAIN_MANIFEST,
    output:
        dataset=TRAIN_ROOT / "nnUNet_raw" / NNUNET_DATASET / "dataset.json",
        splits=TRAIN_ROOT / "nnUNet_raw" / NNUNET_DATASET / "splits_final.json",
    log:
        LOGS / "train" / "semantic_training_data.log",
    threads: 2
    params:
        root=TRAIN_ROOT,
        args=(
            f"--dataset-id {SEM['dataset_id']} --dataset-name {SEM['name']}"
            f" --orientation {words(SEM['orientation'])} --spacing {words(SEM['resolution'])}"
            f" --folds {SEM['folds']} --shrink {words(config['n4']['shrink'])}"
            f" --iterations {words(config['n4']['iterations'])} --bias-fwhm {config['n4']['bias_fwhm']}"
        ),
    shell:
        "spinecohort train-semantic-data --manifest {input.manifest} --root {params.root}"
        " {params.args} --threads {threads} &> {log}"


rule plan_semantic_training:
    input:
        rules.semantic_training_data.output,
    output:
        plans=TRAIN_ROOT / "nnUNet_preprocessed" / NNUNET_DATASET / "nnUNetPlans.json",
    log:
        LOGS / "train" / "plan_semantic_training.log",
    threads: 2
    params:
        root=TRAIN_ROOT,
        args=(
            f"--dataset-id {SEM['dataset_id']} --dataset-name {SEM['name']}"
            f" --spacing {words(SEM['resolution'])} --patch-size {words(SEM['patch_size'])}"
            f" --batch-size {SEM['batch_size']}"
            + (f" --features {words(SEM['features'])}" if SEM.get("features") else "")
        ),
    shell:
        "spinecohort train-semantic-plan --root {params.root} {params.args} --threads {threads} &> {log}"


rule train_semantic_fold:
    input:
        plans=rules.plan_semantic_training.output.plans,
        pretrained=lambda w: (
            [f"{SEM['pretrained']}/fold_{w.fold}/checkpoint_final.pth"]
            if SEM.get("pretrained")
            else []
        ),
    output:
        FOLD_RESULTS / "fold_{fold}" / "checkpoint_final.pth",
    log:
        LOGS / "train" / "semantic_fold{fold}.log",
    benchmark:
        BENCH / "train" / "semantic_fold{fold}.tsv"
    threads: 2
    resources:
        gpu=1 if config["device"] != "cpu" else 0,
        mem_mb=memory_mb(16000),
        runtime=lambda wildcards, attempt: 60 * 24 * attempt,
    params:
        root=TRAIN_ROOT,
        args=(
            f"--dataset-id {SEM['dataset_id']} --epochs {SEM['epochs']}"
            f" --iterations-per-epoch {SEM['iterations_per_epoch']}"
            f" --val-iterations-per-epoch {SEM['val_iterations_per_epoch']} --seed {TRAIN['seed']}"
            + (f" --pretrained {SEM['pretrained']}" if SEM.get("pretrained") else "")
        ),
        device=config["device"],
    shell:
        "spinecohort train-semantic-fold --root {params.root} {params.args} --fold {wildcards.fold}"
        " --device {params.device} --threads {threads} &> {log}"


rule export_semantic_model:
    input:
        expand(FOLD_RESULTS / "fold_{fold}" / "checkpoint_final.pth", fold=TRAIN_FOLDS),
    output:
        config=TRAINED_SEMANTIC / "inference_config.json",
        checkpoints=expand(
            TRAINED_SEMANTIC / "fold_{fold}" / "checkpoint_final.pth", fold=TRAIN_FOLDS
        ),
    log:
        LOGS / "train" / "export_semantic_model.log",
    params:
        root=TRAIN_ROOT,
        folder=TRAINED_SEMANTIC,
        args=(
            f"--dataset-id {SEM['dataset_id']} --folds {SEM['folds']} --orientation {words(SEM['orientation'])}"
            f" --spacing {words(SEM['resolution'])} --name {SEM['model_name']}"
        ),
    shell:
        "spinecohort export-semantic-model --root {params.root} {params.args} --out {params.folder} &> {log}"


rule train_instance_model:
    input:
        manifest=TRAIN_MANIFEST,
    output:
        config=TRAINED_INSTANCE / "inference_config.json",
        weights=TRAINED_INSTANCE / "instance_weights.ckpt",
    log:
        LOGS / "train" / "instance_model.log",
    benchmark:
        BENCH / "train" / "instance_model.tsv"
    threads: 2
    resources:
        gpu=1 if config["device"] != "cpu" else 0,
        mem_mb=memory_mb(16000),
        runtime=lambda wildcards, attempt: 60 * 24 * attempt,
    params:
        folder=TRAINED_INSTANCE,
        augment=json.dumps(INST["augment"]),
        args=(
            f"--spacing {words(INST['resolution'])} --cutout {words(INST['cutout'])}"
            f" --min-corpus {INST['min_corpus']} --epochs {INST['epochs']} --batch-size {INST['batch_size']}"
            f" --lr {words(INST['lr'])} --dim {INST['dim']} --seed {TRAIN['seed']} --name {INST['model_name']}"
        ),
        device=config["device"],
    shell:
        "spinecohort train-instance --manifest {input.manifest} --out {params.folder} {params.args}"
        " --augment {params.augment:q} --device {params.device} --threads {threads} &> {log}"


rule demo_labeling_cohort:
    """Phantoms with ribs and transitional vertebrae: what a labelling model learns levels from."""
    output:
        manifest=RESULTS / "training" / "demo_labeling_cohort" / "cohort.tsv",
    log:
        LOGS / "demo_labeling_cohort.log",
    params:
        demo=LAB["demo"],
        preset=config["demo"]["preset"],
        folder=lambda wildcards, output: Path(output.manifest).parent,
    shell:
        "spinecohort phantom {params.folder} --subjects {params.demo[subjects]} --seed {params.demo[seed]}"
        " --first-index {params.demo[first_index]} --preset {params.preset} --ribs --anomaly mixed"
        " --rudimentary-t12 {params.demo[rudimentary_t12]} --lumbar-ribs {params.demo[lumbar_ribs]} &> {log}"


rule train_labeling_model:
    input:
        manifest=LABELING_TRAIN_MANIFEST,
    output:
        config=TRAINED_LABELING / "inference_config.json",
    log:
        LOGS / "train" / "labeling_model.log",
    benchmark:
        BENCH / "train" / "labeling_model.tsv"
    threads: 2
    resources:
        gpu=1 if config["device"] != "cpu" else 0,
        mem_mb=memory_mb(8000),
        runtime=lambda wildcards, attempt: 60 * 24 * attempt,
    params:
        folder=TRAINED_LABELING,
        resolution=json.dumps(LAB["resolution_range"]),
        args=(
            f"--cutout {words(LAB['cutout'])} --backbone {LAB['backbone']} --epochs {LAB['epochs']}"
            f" --batch-size {LAB['batch_size']} --lr {words(LAB['lr'])} --seed {TRAIN['seed']} --name {LAB['model_name']}"
        ),
        device=config["device"],
    shell:
        "spinecohort train-labeling --manifest {input.manifest} --out {params.folder} {params.args}"
        " --resolution-range {params.resolution:q} --device {params.device} --threads {threads} &> {log}"
