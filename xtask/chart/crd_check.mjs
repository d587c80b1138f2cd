// Validates Prometheus Operator objects (monitoring.coreos.com/v1) against the schemas of
// the @kubernetes-models/prometheus-operator package, generated from the operator's CRDs.
// Kubernetes' own schemas (kubernetes-validate) do not cover CRDs.
//
// Usage: node crd_check.mjs OBJECTS.json   (a JSON list; objects of other groups are ignored)
// Prints one line per checked object; exits 1 if any fails.
import { readFileSync } from "node:fs";
import * as models from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const obj of objects) {
  if (obj.apiVersion !== "monitoring.coreos.com/v1") continue;
  const Model = models[obj.kind];
  const what = `${obj.kind}/${obj.metadata?.name}`;
  if (!Model) {
    console.log(`FAIL ${what}: no schema for kind ${obj.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok ${what}`);
  } catch (e) {
    console.log(`FAIL ${what}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
