# The embedded demo: a phantom cohort and a demo model, both made by the workflow.


checkpoint demo_cohort:
    output:
        manifest=RESULTS / "demo" / "cohort.tsv",
    log:
        LOGS / "demo_cohort.log",
    conda:
        "../../envs/spinecohort.yaml"
    params:
        subjects=config["demo"]["subjects"],
        seed=config["demo"]["seed"],
        preset=config["demo"]["preset"],
        batch_size=config["batch_size"],
        folder=lambda wildcards, output: Path(output.manifest).parent,
    shell:
        "spinecohort phantom {params.folder} --subjects {params.subjects} --seed {params.seed}"
        " --preset {params.preset} --batch-size {params.batch_size} --snapshot &> {log}"


rule demo_semantic_model:
    output:
        config=DEMO_MODEL / "inference_config.json",
        checkpoints=expand(
            DEMO_MODEL / "fold_{fold}" / "checkpoint_final.pth", fold=FOLDS
        ),
    log:
        LOGS / "demo_semantic_model.log",
    conda:
        "../../envs/spinecohort.yaml"
    params:
        folder=lambda wildcards, output: Path(output.config).parent,
        folds=len(FOLDS),
    shell:
        "spinecohort random-model {params.folder} --folds {params.folds} &> {log}"


rule demo_instance_model:
    output:
        config=DEMO_INSTANCE_MODEL / "inference_config.json",
        weights=DEMO_INSTANCE_MODEL / "instance_weights.ckpt",
    log:
        LOGS / "demo_instance_model.log",
    conda:
        "../../envs/spinecohort.yaml"
    params:
        folder=lambda wildcards, output: Path(output.config).parent,
    shell:
        "spinecohort random-instance-model {params.folder} &> {log}"
