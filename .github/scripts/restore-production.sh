#!/usr/bin/env bash
# Restore production from the GitHub releases into the local registry, reserve every number
# already used by a model-v<N> tag or release, and decide whether HEAD_SHA may be deployed.
#
# Needs: gh (GH_TOKEN), git with full history and tags, jq, and the project's wine-assets.
# Env: GITHUB_REPOSITORY, HEAD_SHA, RUNNER_TEMP (downloads go there, outside the checkout);
# writes deploy=true|false to GITHUB_OUTPUT.
set -euo pipefail
wine_assets=${WINE_ASSETS:-.venv/bin/wine-assets}
restore="${RUNNER_TEMP:?RUNNER_TEMP must name a folder outside the checkout}/restore"

# Published model-v<N> releases (drafts excluded), highest first, and model-v<N> tags. The list
# is taken first so that a failing gh stops the script (inside <(...) its failure would not).
listing=$(gh release list --repo "$GITHUB_REPOSITORY" --exclude-drafts --limit 1000 \
  --json tagName,isDraft --jq '.[] | select(.isDraft | not) | .tagName | select(test("^model-v[1-9][0-9]*$"))
                               | ltrimstr("model-v")')
mapfile -t released < <(printf '%s\n' "$listing" | sed '/^$/d' | sort -rn)
mapfile -t tagged < <(git tag --list 'model-v*' | sed -n 's/^model-v\([1-9][0-9]*\)$/\1/p' | sort -rn)
highest=$(printf '%s\n' 0 "${released[@]}" "${tagged[@]}" | sort -n | tail -1)
for number in "${tagged[@]}"; do
  if ! printf '%s\n' "${released[@]}" | grep -qx "$number"; then
    echo "::warning::tag model-v${number} has no release (an attempt that failed half-way?); its number stays taken"
  fi
done

# The highest release that holds a bundle is production. One without a bundle was made by
# hand: skipped with a warning, its number stays taken.
production=""
for number in "${released[@]}"; do
  bundles=$(gh release view "model-v${number}" --repo "$GITHUB_REPOSITORY" --json assets \
    --jq '[.assets[].name | select(endswith(".tar.gz"))] | length')
  if [ "$bundles" = 0 ]; then
    echo "::warning::release model-v${number} has no bundle (.tar.gz): skipped"
    continue
  fi
  rm -rf "$restore" && mkdir "$restore"
  gh release download "model-v${number}" --repo "$GITHUB_REPOSITORY" --pattern "*.tar.gz" --dir "$restore"
  for bundle in "$restore"/*.tar.gz; do "$wine_assets" registry import "$bundle" --production; done
  production=$number
  break
done

# Numbers go on from the highest of tags and releases, so no tag is ever reused.
if [ "$highest" -gt 0 ]; then "$wine_assets" registry reserve "$highest"; fi

if [ -z "$production" ]; then
  echo "no model released yet: this release will be v$((highest + 1))"
  echo "deploy=true" >> "$GITHUB_OUTPUT"
  exit 0
fi

# Only a commit that descends from production's may replace it: re-running an old pipeline
# run must not publish its old model as the newest version (a silent rollback).
commit=$("$wine_assets" registry show --json | jq -r '.git_commit // empty')
if [ -z "$commit" ]; then
  commit=$(git rev-parse --verify --quiet "refs/tags/model-v${production}^{commit}" || true)
fi
if [ -z "$commit" ] || ! git cat-file -e "${commit}^{commit}" 2> /dev/null; then
  echo "::error::production v${production} was released from commit '${commit}', which is not in this history;" \
    "release by hand from a commit that descends from it"
  exit 1
fi
if git merge-base --is-ancestor "$commit" "$HEAD_SHA"; then
  echo "${HEAD_SHA} descends from ${commit} (production v${production}): deploying"
  echo "deploy=true" >> "$GITHUB_OUTPUT"
else
  echo "::notice::skipped: ${HEAD_SHA} does not descend from ${commit}, the commit of production v${production}"
  echo "deploy=false" >> "$GITHUB_OUTPUT"
fi
