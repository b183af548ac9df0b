rule predict_fold:
    input:
        manifest=ancient(MANIFEST),
        resampled=stage_dir("resample"),
        model=get_model_file("inference_config.json"),
        checkpoint=get_fold_checkpoint,
    output:
        temp(directory(SCRATCH / "{batch}" / layout.folder("predict-fold"))),
    log:
        LOGS / "predict_fold" / "{batch}_fold{fold}.log",
    benchmark:
        BENCH / "predict_fold" / "{batch}_fold{fold}.tsv"
    threads: 2
    resources:
        gpu=1 if config["device"] != "cpu" else 0,
        mem_mb=memory_mb(8000),
        runtime=batch_minutes(1.0),
        scratch_mib=scratch_mib,
    params:
        device=config["device"],
    shell:
        "spinecohort predict-fold --manifest {input.manifest} --batch {wildcards.batch}"
        " --input {input.resampled} --model {input.model} --fold {wildcards.fold}"
        " --device {params.device} --threads {threads} --out {output} &> {log}"


rule average_folds:
    input:
        manifest=ancient(MANIFEST),
        model=get_model_file("inference_config.json"),
        folds=get_fold_logits,
        resampled=stage_dir("resample"),
    output:
        directory(stage_dir("average-folds")),
    log:
        LOGS / "average_folds" / "{batch}.log",
    benchmark:
        BENCH / "average_folds" / "{batch}.tsv"
    # Before any other ready job: the sooner the folds are averaged, the sooner their logits go.
    priority: 10
    threads: 1
    resources:
        mem_mb=memory_mb(4000),
        runtime=batch_minutes(0.2),
    params:
        uncertainty="--uncertainty" if config["uncertainty"] else "",
    shell:
        "spinecohort average-folds --manifest {input.manifest} --batch {wildcards.batch}"
        " --folds {input.folds} --resampled {input.resampled} --model {input.model}"
        " {params.uncertainty} --out {output} &> {log}"


rule restore:
    input:
        manifest=ancient(MANIFEST),
        semantic=stage_dir("average-folds"),
        instances=stage_dir("assemble-instances"),
        provenance=rules.describe.output.provenance,
    output:
        directory(stage_dir("restore")),
    log:
        LOGS / "restore" / "{batch}.log",
    benchmark:
        BENCH / "restore" / "{batch}.tsv"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=batch_minutes(0.1),
    params:
        derivatives=DERIVATIVES,
    shell:
        "spinecohort restore --manifest {input.manifest} --batch {wildcards.batch}"
        " --input {input.semantic} --instances {input.instances}"
        " --derivatives {params.derivatives} --provenance {input.provenance} --out {output} &> {log}"
