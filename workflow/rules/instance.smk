# Instance phase: vertebra instances from the semantic masks (SPINEPS-style cutout U-Net).


rule assemble_instances:
    input:
        manifest=ancient(MANIFEST),
        semantic=stage_dir("average-folds"),
        model=get_instance_model_file("inference_config.json"),
    output:
        directory(stage_dir("assemble-instances")),
    log:
        LOGS / "assemble_instances" / "{batch}.log",
    benchmark:
        BENCH / "assemble_instances" / "{batch}.tsv"
    threads: 2
    resources:
        mem_mb=memory_mb(6000),
        runtime=batch_minutes(0.5),
        gpu=1 if config["device"] != "cpu" else 0,
    params:
        members=get_batch_members,
        device=config["device"],
    shell:
        "spinecohort assemble-instances --manifest {input.manifest} --batch {wildcards.batch}"
        " --input {input.semantic} --model {input.model} --device {params.device}"
        " --threads {threads} --out {output} &> {log}"


rule label_vertebrae:
    """Only with a labelling model (config labeling_model.path): SPINEPS's third phase on the restored stations."""
    input:
        manifest=ancient(MANIFEST),
        restore=stage_dir("restore"),
        model=f"{LABELING_MODEL}/inference_config.json",
    output:
        directory(stage_dir("label-vertebrae")),
    log:
        LOGS / "label_vertebrae" / "{batch}.log",
    benchmark:
        BENCH / "label_vertebrae" / "{batch}.tsv"
    threads: 2
    resources:
        mem_mb=memory_mb(4000),
        runtime=batch_minutes(0.2),
        gpu=1 if config["device"] != "cpu" else 0,
    params:
        members=get_batch_members,
        model=LABELING_MODEL,
        device=config["device"],
        enforce=(
            "--enforce-12-thoracic"
            if config["labeling_model"]["enforce_12_thoracic"]
            else ""
        ),
    shell:
        "spinecohort label-vertebrae --manifest {input.manifest} --batch {wildcards.batch}"
        " --restore {input.restore} --model {params.model} --device {params.device} {params.enforce}"
        " --threads {threads} --out {output} &> {log}"
