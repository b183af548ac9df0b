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
