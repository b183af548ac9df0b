# The run's provenance (versions, models, parameters): every sidecar and summary carries it.


localrules:
    describe,


rule describe:
    """Once per run; its file changes only when the models, folds or parameters do."""
    input:
        semantic=get_model_file("inference_config.json"),
        instance=get_instance_model_file("inference_config.json"),
    output:
        provenance=RESULTS / layout.PROVENANCE,
        dataset_description=DERIVATIVES / layout.DATASET_DESCRIPTION,
    log:
        LOGS / "describe.log",
    threads: 1
    resources:
        mem_mb=memory_mb(1000),
        runtime=lambda wildcards, attempt: 5 * attempt,
    params:
        semantic=MODEL,
        instance=INSTANCE_MODEL,
        folds=words(FOLDS),
        parameters=shlex.quote(
            json.dumps({key: config[key] for key in ("n4", "metrics", "device")})
        ),
    shell:
        "spinecohort describe --semantic-model {params.semantic} --instance-model {params.instance}"
        " --folds {params.folds} --parameters {params.parameters} --out {output.provenance}"
        " --dataset-description {output.dataset_description} &> {log}"
