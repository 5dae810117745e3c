"""The nightly bulk migration as an Airflow DAG (Cloud Composer or any Airflow
with apache-airflow-providers-google): launch the flex template over the
whole prefix every night. Outputs already migrated with this spec are
skipped without reading their inputs, so each night migrates only what is new.

Set the Airflow Variables ckpt_surgery_{project,region,template,image,input,output,spec}.
"""
import datetime

from airflow import DAG
from airflow.models import Variable
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

PARAMETERS = ('input', 'output', 'spec', 'sdk_container_image')

with DAG(
    dag_id='ckpt_surgery_nightly',
    schedule='0 2 * * *',
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # a night's run finishes before the next starts
    tags=['ckpt-surgery'],
) as dag:
  DataflowStartFlexTemplateOperator(
      task_id='migrate_new_checkpoints',
      project_id=Variable.get('ckpt_surgery_project'),
      location=Variable.get('ckpt_surgery_region', 'us-central1'),
      body={'launchParameter': {
          'jobName': 'ckpt-surgery-nightly-{{ ds_nodash }}',
          'containerSpecGcsPath': Variable.get('ckpt_surgery_template'),
          'parameters': {
              'input': Variable.get('ckpt_surgery_input'),
              'output': Variable.get('ckpt_surgery_output'),
              'spec': Variable.get('ckpt_surgery_spec'),
              'sdk_container_image': Variable.get('ckpt_surgery_image'),
          },
          'environment': {
              'machineType': 'g2-standard-8',
              'maxWorkers': 32,
              'additionalExperiments': ['use_runner_v2', 'no_use_multiple_sdk_containers'],
              'serviceOptions': ['worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver'],
          },
      }},
      wait_until_finished=True,
  )
