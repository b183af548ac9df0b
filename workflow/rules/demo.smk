# The embedded demo: a phantom cohort made by the workflow; the demo models ship in
# resources/demo_models (trained by train.smk, see MODEL.md there).


rule demo_cohort:
    output:
        manifest=RESULTS / "demo" / "cohort.tsv",
    log:
        LOGS / "demo_cohort.log",
    params:
        subjects=config["demo"]["subjects"],
        seed=config["demo"]["seed"],
        preset=config["demo"]["preset"],
        batch_size=config["batch_size"],
        ribs="--ribs" if config["demo"]["ribs"] else "",
        folder=lambda wildcards, output: Path(output.manifest).parent,
    shell:
        "spinecohort phantom {params.folder} --subjects {params.subjects} --seed {params.seed}"
        " --preset {params.preset} --batch-size {params.batch_size} {params.ribs} --snapshot &> {log}"
