# The embedded demo: a phantom cohort and a demo model, both made by the workflow.


checkpoint demo_cohort:
    output:
        manifest=RESULTS / "demo" / "cohort.tsv",
    log:
        LOGS / "demo_cohort.log",
    params:
        subjects=config["demo"]["subjects"],
        seed=config["demo"]["seed"],
        preset=config["demo"]["preset"],
    conda:
        "../../envs/spinecohort.yaml"
    shell:
        "spinecohort phantom {RESULTS}/demo --subjects {params.subjects} --seed {params.seed}"
        " --preset {params.preset} --batch-size {config[batch_size]} --snapshot &> {log}"


rule demo_semantic_model:
    output:
        config=RESULTS / "demo" / "models" / "semantic_random" / "inference_config.json",
        checkpoints=expand(
            RESULTS / "demo" / "models" / "semantic_random" / "fold_{fold}" / "checkpoint_final.pth",
            fold=FOLDS,
        ),
    log:
        LOGS / "demo_semantic_model.log",
    params:
        folder=lambda wildcards, output: Path(output.config).parent,
        folds=len(FOLDS),
    conda:
        "../../envs/spinecohort.yaml"
    shell:
        "spinecohort random-model {params.folder} --folds {params.folds} &> {log}"
